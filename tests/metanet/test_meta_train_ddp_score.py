"""Meta-training under DDP: every rank scores a share of the validation members and no rank waits in a
collective while another scores (issue 12 item 8). Two CPU processes (gloo), a short collective timeout,
and rank 0 made slower at scoring than that timeout."""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 6  # the process group's collective timeout in this test
SLOW_S = 9  # rank 0 scores this much longer: a rank waiting in a collective would time out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    from metaprune.data import load_dataset

    return load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)


def _cfg():
    from metaprune.metanet.config import MetaTrainConfig

    return MetaTrainConfig(epochs=1, steps_per_member=1, batch_size=16, val_members=2, score_steps=1,
                           score_batches=1, device="cpu", lam=0.5, prune_aware=0.0)


def _worker(rank, world, port, zoo, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    mt = importlib.import_module("metaprune.metanet.meta_train")
    from metaprune.metanet.config import MetanetConfig

    scored, real = [], mt._score_one

    def recording(net, path, data, cfg):
        if rank == 0 and net is not None:
            time.sleep(SLOW_S)
        scored.append([net is not None, path.name])
        return real(net, path, data, cfg)

    mt._score_one = recording
    mt.meta_train(zoo, _data(), out, _cfg(), MetanetConfig(hidden=8, layers=1, edit="scale", rho=1.0), resume=False)
    with open(os.path.join(os.path.dirname(out), f"scored_{rank}.json"), "w") as f:
        json.dump(scored, f)
    dist.destroy_process_group()


def test_every_rank_scores_a_share_and_none_times_out_waiting(tmp_path):
    from metaprune.engine import TrainConfig
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.zoo import ZooConfig, build_zoo, list_members

    zoo, out = tmp_path / "zoo", tmp_path / "mn"
    build_zoo(ZooConfig(arch="cifar_resnet20", data="synthetic", count=3, train_subset=None,
                        train=TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1)), _data(), zoo)
    mp.spawn(_worker, args=(2, _free_port(), str(zoo), str(out)), nprocs=2, join=True)  # raises if a rank failed
    scored = [json.loads((tmp_path / f"scored_{r}.json").read_text()) for r in range(2)]
    # val members member_001, member_002: each rank scored one, unedited (baseline) and edited
    assert scored[0] == [[False, "member_001"], [True, "member_001"]]
    assert scored[1] == [[False, "member_002"], [True, "member_002"]]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the gathered scores are in member order and equal what one process computes
    from metaprune.metanet.meta_train import score_members

    net, _ = load_metanet(out)
    val = list_members(zoo)[1:]
    single = score_members(net, val, _data(), _cfg())
    assert log[0]["member_scores"] == single["scores"] and log[0]["score"] == single["score"]
    assert log[0]["baseline_score"] == score_members(None, val, _data(), _cfg())["score"]
