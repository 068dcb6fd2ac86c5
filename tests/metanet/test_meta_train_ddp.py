"""Meta-training under DistributedDataParallel: 2 CPU processes (gloo), like torchrun on 2 GPUs."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_zoo(root):
    from metaprune.data import load_dataset
    from metaprune.engine import TrainConfig
    from metaprune.metanet.zoo import ZooConfig, build_zoo

    data = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)
    cfg = ZooConfig(arch="cifar_resnet20", data="synthetic", count=2, train_subset=None,
                    train=TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1, resume=False))
    build_zoo(cfg, data, root)
    return data


def _worker(rank, world, port, zoo, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from metaprune.data import load_dataset
    from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
    from metaprune.metanet.meta_train import meta_train

    data = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)
    cfg = MetaTrainConfig(epochs=1, steps_per_member=2, batch_size=16, val_members=1, score_steps=1,
                          score_batches=1, device="cpu", lam=0.5, prune_aware=1.0, prune_hard=True)
    meta_train(zoo, data, out, cfg, MetanetConfig(hidden=8, layers=1, edit="scale", rho=1.0), resume=False)
    from metaprune.metanet.checkpoint import load_metanet

    flat = torch.cat([p.flatten() for p in load_metanet(out)[0].parameters()])
    got = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(got, flat)
    if rank == 0:
        torch.save({"same": torch.tensor(all(torch.equal(got[0], g) for g in got))}, os.path.join(out, "same.pt"))
    dist.destroy_process_group()


def test_meta_train_ddp_two_processes(tmp_path):
    zoo, out = str(tmp_path / "zoo"), str(tmp_path / "mn")
    _tiny_zoo(zoo)
    mp.spawn(_worker, args=(2, _free_port(), zoo, out), nprocs=2, join=True)
    assert bool(torch.load(os.path.join(out, "same.pt"), weights_only=True)["same"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 1 and {"ce", "sparsity", "score"} <= set(log[0]) and log[0]["ce_pruned"] > 0
    assert sorted(os.listdir(out)) == ["config.json", "last.pt", "log.jsonl", "metanet.safetensors", "same.pt",
                                       "summary.json"]
