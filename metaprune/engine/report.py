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
    """(C, H, W) the model is used with: the data's shape, else the input size recorded with the model (the
    size it was trained / pruned at), its image_size argument or the registry's default size."""
    if data is not None:
        return (data.in_chans, data.image_size, data.image_size)
    from metaprune.models.registry import recorded_input_size  # the size it was trained / pruned at

    args = getattr(model, "metaprune_arch", {"arch": None, "args": {}})["args"]
    size = recorded_input_size(model)
    return (args.get("in_chans", 3), size, size)


def environment(device: str | torch.device | None = None) -> dict:
    """Versions and hardware, for reports: ``device`` is the device the command ran on and
    ``device_name`` that device's name (the GPU actually used, not GPU 0); ``cuda`` is the CUDA
    device's name when ``device`` is a CUDA device, else None. Without ``device`` the visible GPUs
    are listed (``cuda_visible``) and none is claimed."""
    out = {"metaprune": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "device": None, "device_name": None, "cuda": None}
    dev = None
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            dev = None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index < torch.cuda.device_count():
            out.update(device=f"cuda:{index}", device_name=torch.cuda.get_device_name(index))
            out["cuda"] = out["device_name"]
    elif dev is not None and dev.type == "cpu":
        out.update(device="cpu", device_name=platform.processor() or platform.machine() or "cpu")
    if dev is None and torch.cuda.is_available():
        out["cuda_visible"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


def _device_of(report: dict) -> str | None:
    """The device a report's measurements name (``latency`` entries, or a top-level ``device``)."""
    stack = [report]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            dev = d.get("device")
            if isinstance(dev, str) and dev.split(":")[0] in ("cpu", "cuda"):
                return dev
            stack.extend(v for v in d.values() if isinstance(v, dict))
    return None


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


def write_report(out_dir: str | Path, report: dict, name: str = "report.json",
                 device: str | torch.device | None = None) -> Path:
    """Write ``report.json`` (with the environment of ``device``, else of the device the report's
    measurements name) into ``out_dir``, atomically."""
    report = {**report, "environment": environment(device if device is not None else _device_of(report))}
    return write_json(Path(out_dir) / name, report)
