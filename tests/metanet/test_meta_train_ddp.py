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


def _worker(rank, world, port, zoo, out, ranks_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from metaprune.data import load_dataset
    from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
    from metaprune.metanet.meta_train import meta_train
    from metaprune.metanet.model import Metanet

    # keep a handle on the metanetwork this process trains (its own in-memory replica), and its
    # initial parameters: what each rank ends with is compared across ranks, not a file rank 0 wrote
    made, init = [], []
    build = Metanet.for_graph.__func__

    def for_graph(cls, graph, cfg=None):
        net = build(cls, graph, cfg)
        made.append(net)
        init.append(torch.cat([p.detach().flatten().clone() for p in net.parameters()]))
        return net

    Metanet.for_graph = classmethod(for_graph)  # this spawned process only
    data = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)
    cfg = MetaTrainConfig(epochs=1, steps_per_member=2, batch_size=16, val_members=1, score_steps=1,
                          score_batches=1, device="cpu", lam=0.5, prune_aware=1.0, prune_hard=True)
    meta_train(zoo, data, out, cfg, MetanetConfig(hidden=8, layers=1, edit="scale", rho=1.0), resume=False)
    assert len(made) == 1
    final = torch.cat([p.detach().flatten() for p in made[0].parameters()])
    torch.save({"init": init[0], "final": final}, os.path.join(ranks_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def test_meta_train_ddp_two_processes(tmp_path):
    """Each rank reports its own trained replica: with gradients averaged (DDP) the two are equal
    (and have moved from the initial weights); unsynchronised ranks, trained on their own shards, differ."""
    zoo, out, ranks = str(tmp_path / "zoo"), str(tmp_path / "mn"), tmp_path / "ranks"
    ranks.mkdir()
    _tiny_zoo(zoo)
    mp.spawn(_worker, args=(2, _free_port(), zoo, out, str(ranks)), nprocs=2, join=True)
    r0, r1 = (torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["init"], r1["init"])
    assert not torch.equal(r0["final"], r0["init"])  # training moved the weights
    diff = (r0["final"] - r1["final"]).abs().max().item()
    assert diff <= 1e-6, f"the ranks' replicas differ by {diff}: gradients are not synchronised"
    from metaprune.metanet.checkpoint import load_metanet

    saved = torch.cat([p.flatten() for p in load_metanet(out)[0].parameters()])
    assert torch.equal(saved, r0["final"])  # rank 0 saved the weights it holds (epoch 0 is the only epoch)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 1 and {"ce", "sparsity", "score"} <= set(log[0]) and log[0]["ce_pruned"] > 0
    assert sorted(os.listdir(out)) == ["config.json", "last.pt", "log.jsonl", "metanet.safetensors", "summary.json"]
