"""Run reports: what a command did, measured (``report.json`` beside every output)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from torch import nn

from metaprune import __version__
from metaprune.data.datasets import DataSplits
from metaprune.engine.evaluate import evaluate
from metaprune.engine.measure import profile_model
from metaprune.io import write_json


def input_shape(model: nn.Module, data: DataSplits | None = None) -> tuple[int, int, int]:
    """(C, H, W) the model is used with: the data's shape, else the registry's default size."""
    if data is not None:
        return (data.in_chans, data.image_size, data.image_size)
    from metaprune.models import get_entry

    spec = getattr(model, "metaprune_arch", {"arch": None, "args": {}})
    args = spec["args"]
    size = args.get("image_size") or (get_entry(spec["arch"]).default_image_size if spec["arch"] else 32)
    return (args.get("in_chans", 3), size, size)


def environment() -> dict:
    """Versions and hardware, for reports."""
    return {"metaprune": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def model_summary(model: nn.Module, data: DataSplits | None, device: torch.device | str = "cpu",
                  latency: bool = True, batches: tuple[int, ...] = (1, 64), split: str = "test",
                  eval_batches: int | None = None) -> dict:
    """Params, MACs, bytes, latency and (with data) accuracy of a model, as a JSON-ready dict."""
    shape = input_shape(model, data)
    out = profile_model(model, shape, device, batches=batches, latency=latency)
    if data is not None:
        r = evaluate(model, getattr(data, split), device=device, desc=split, max_batches=eval_batches)
        out[f"{split}_acc"] = r["acc"]
        out[f"{split}_loss"] = r["loss"]
        out["data"] = data.name + (" (synthetic)" if data.synthetic else "")
    return out


def write_report(out_dir: str | Path, report: dict, name: str = "report.json") -> Path:
    """Write ``report.json`` (with the environment) into ``out_dir``, atomically."""
    report = {**report, "environment": environment()}
    return write_json(Path(out_dir) / name, report)
