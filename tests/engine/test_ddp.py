"""DistributedDataParallel on CPU with the gloo backend and 2 processes (what torchrun does on GPUs)."""

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaprune.io import load_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from metaprune import create_model
    from metaprune.data import load_dataset
    from metaprune.engine import TrainConfig, train

    data = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts it)
    model = create_model("cifar_resnet20", num_classes=4, in_chans=1)
    train(model, data, TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu", max_steps_per_epoch=3))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"same": torch.tensor(all(torch.equal(gathered[0], g) for g in gathered))}, out)
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_keep_replicas_in_sync(tmp_path):
    out = str(tmp_path / "r.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    assert bool(torch.load(out, weights_only=True)["same"])


def _five_samples():
    """5 samples and a fixed linear model that gets samples 0, 1 and 3 right (accuracy 60 %)."""
    from metaprune.data.datasets import TensorImageDataset

    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).repeat(1, 1, 2, 2) * 50
    labels = torch.tensor([0, 0, 1, 1, 0])
    ds = TensorImageDataset(images, labels, (0.0,), (1.0,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():  # logit 1 - logit 0 grows with the pixel value: predicts 1 for samples 3 and 4
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        model[1].bias.copy_(torch.tensor([0.0, -2.0]))
    return ds, model


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    from metaprune.engine import evaluate

    dist.init_process_group("gloo")
    ds, model = _five_samples()
    r = evaluate(model, ds, batch_size=1, sharded=True)
    if rank == 0:
        torch.save({k: torch.tensor(float(v)) for k, v in r.items()}, out)
    dist.destroy_process_group()


def test_sharded_evaluation_counts_each_sample_once(tmp_path):
    """5 samples on 3 ranks: the shards are padded to 6 slots; the duplicate must not be counted."""
    from metaprune.engine import evaluate

    ds, model = _five_samples()
    ref = evaluate(model, ds, batch_size=2)
    assert ref["n"] == 5 and abs(ref["acc"] - 60.0) < 1e-9
    out = str(tmp_path / "e.pt")
    mp.spawn(_eval_worker, args=(3, _free_port(), out), nprocs=3, join=True)
    r = {k: float(v) for k, v in torch.load(out, weights_only=True).items()}
    assert r["n"] == 5
    assert abs(r["acc"] - ref["acc"]) < 1e-9 and abs(r["loss"] - ref["loss"]) < 1e-9


def test_torchrun_cli_writes_outputs_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METAPRUNE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "metaprune",
           "train", "--model", "cifar_resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "32",
           "--max-steps-per-epoch", "2", "--device", "cpu", "-o", str(tmp_path / "run"), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["last.pt", "model.safetensors", "report.json"]
    model, info = load_model(tmp_path / "run" / "model.safetensors")
    assert info.arch == "cifar_resnet20"
