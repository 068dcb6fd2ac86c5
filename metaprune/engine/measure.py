"""Params, MACs, file size and measured latency of a model."""

from __future__ import annotations

import statistics
import time

import torch
import torch_pruning as tp
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what a safetensors file of the model holds, less its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs per image (torch-pruning's counter, the convention of the DepGraph paper)."""
    device = next(model.parameters()).device
    macs, _ = tp.utils.count_ops_and_params(model, torch.randn(1, *input_shape, device=device))
    return int(macs)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    warmup: int = 3, repeats: int = 10, min_seconds: float = 0.0) -> dict:
    """Median wall time of one forward pass, in milliseconds.

    CUDA timings synchronise and use CUDA events. ``dtype`` bf16 runs the model under autocast.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    use_amp = dtype != torch.float32

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            model(x)

    for _ in range(warmup):
        run()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - t_start < min_seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    model.train(was_training)
    return {"ms": statistics.median(times), "batch": batch_size, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "warmup": warmup, "repeats": len(times),
            "threads": torch.get_num_threads()}


def profile_model(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                  batches: tuple[int, ...] = (1, 64), latency: bool = True, repeats: int = 10) -> dict:
    """Params, MACs, bytes and (optionally) latency at each batch size, as one JSON-ready dict."""
    out = {"params": count_params(model), "macs": count_macs(model, input_shape), "bytes": state_bytes(model),
           "input_shape": list(input_shape)}
    if latency:
        out["latency"] = {str(b): measure_latency(model, input_shape, b, device, repeats=repeats) for b in batches}
    return out
