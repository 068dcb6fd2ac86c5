"""Under torchrun only rank 0 writes a bundle and its report (gloo, 2 processes on CPU)."""

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


def _worker(rank: int, world: int, port: int, source: str, out: str, log: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), METAPRUNE_NO_PROGRESS="1")
    torch.set_num_threads(1)
    import metaprune.engine.report as report_mod
    import spa.bundle as bundle_mod
    from spa.api import AdaptConfig, adapt_task

    calls = []
    save, write = bundle_mod.save_bundle, report_mod.write_report

    def save_spy(*a, **k):
        calls.append("bundle")
        return save(*a, **k)

    def write_spy(*a, **k):
        calls.append("report")
        return write(*a, **k)

    bundle_mod.save_bundle, report_mod.write_report = save_spy, write_spy
    cfg = AdaptConfig(method="splora", rank=2, ratio=0.5, steps=1, warmup_epochs=0, recovery_epochs=1, min_steps=0,
                      max_steps_per_epoch=1, batch_size=16, device="cpu")
    res = adapt_task(source, "synthetic", out, cfg)
    with open(f"{log}.{rank}", "w") as f:
        json.dump({"calls": calls, "test_acc": res.report["test_acc"]}, f)
    dist.destroy_process_group()


def test_only_rank0_writes_bundle_and_report(source_path, tmp_path):
    out, log = tmp_path / "bundle", str(tmp_path / "calls")
    mp.spawn(_worker, args=(2, _free_port(), source_path, str(out), log), nprocs=2, join=True)
    r0, r1 = (json.loads(open(f"{log}.{r}").read()) for r in (0, 1))
    assert r0["calls"] == ["bundle", "report"] and r1["calls"] == []
    assert r0["test_acc"] == r1["test_acc"]  # every rank returns rank 0's report
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "report.json"]
