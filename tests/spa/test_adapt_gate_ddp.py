"""Under torchrun every process prunes with rank 0's gate masks (gloo, 2 processes on CPU)."""

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


def _keep(source: str, seed: int) -> dict:
    from metaprune.io import load_model
    from spa import adapt_model
    from spa.gate import gate_step_keep
    from spa.methods import get_method
    from spa.prune import build_graph, channel_groups

    src, _ = load_model(source)
    cfg_cls, _ = get_method("splora")
    m = adapt_model(src.eval(), "splora", cfg_cls(rank=2), num_classes=4, seed=0).eval()
    groups = channel_groups(m, build_graph(m, torch.zeros(1, 1, 28, 28)), m.get_submodule(m.spa_head))
    gen = torch.Generator().manual_seed(seed)  # each process sees other batches and another seed
    batches = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 4, (8,), generator=gen))]
    keep, _ = gate_step_keep(m, groups, 0.5, batches, steps=3, lr=0.05, seed=seed)
    return {k: v.tolist() for k, v in keep.items()}


def _worker(rank: int, world: int, port: int, source: str, log: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    keep = _keep(source, seed=rank)
    with open(f"{log}.{rank}", "w") as f:
        json.dump(keep, f)
    dist.destroy_process_group()


def test_every_rank_takes_rank0_masks(source_path, tmp_path):
    log = str(tmp_path / "keep")
    mp.spawn(_worker, args=(2, _free_port(), source_path, log), nprocs=2, join=True)
    r0, r1 = (json.loads(open(f"{log}.{r}").read()) for r in (0, 1))
    assert r0 == r1
    assert r0 == _keep(source_path, seed=0)  # rank 0's own choice
    assert r1 != _keep(source_path, seed=1)  # rank 1 alone would have chosen otherwise
