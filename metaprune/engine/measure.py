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


def _timer(device: torch.device):
    """A function ``time(run) -> ms`` for one call of ``run``: CUDA events between two device
    synchronisations on CUDA (the GPU's own clock, not the launch time), ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        def time_cuda(run) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            return float(start.elapsed_time(end))
        return time_cuda

    def time_wall(run) -> float:
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    return time_wall


class _Threads:
    """Run with exactly ``n`` intra-op threads (CPU timings depend on it), restoring the old count."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self) -> int:
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(int(self.n))
        return torch.get_num_threads()

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


def _runner(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype):
    use_amp = dtype != torch.float32

    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            model(x)
    return run


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    warmup: int = 3, repeats: int = 10, min_seconds: float = 0.0, threads: int | None = None) -> dict:
    """Median wall time of one forward pass, in milliseconds (one model alone).

    CUDA timings synchronise and use CUDA events. ``dtype`` bf16 runs the model under autocast.
    To compare models (before / after pruning) use :func:`compare_latency`, which interleaves them.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    run, timer = _runner(model, x, device, dtype), _timer(device)
    with _Threads(threads) as n_threads:
        for _ in range(warmup):
            run()
        times: list[float] = []
        t_start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - t_start < min_seconds:
            times.append(timer(run))
            if len(times) >= 10 * repeats:
                break
    model.train(was_training)
    return {"ms": statistics.median(times), "batch": batch_size, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "warmup": warmup, "repeats": len(times),
            "threads": n_threads, "timer": "cuda-events" if device.type == "cuda" else "perf_counter"}


def round_ratio(ref_rounds: list[float], new_rounds: list[float]) -> float:
    """Median over rounds of ``ref ms / new ms`` (> 1: ``new`` is faster), from interleaved rounds."""
    return statistics.median(a / b for a, b in zip(ref_rounds, new_rounds))


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch_size: int = 1,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, warmup: int = 3,
                    rounds: int = 10, repeats: int = 3, threads: int | None = None) -> dict:
    """Latency of several models measured together, so that their ratio means something.

    Every model is warmed up, then timed in ``rounds`` rounds; in each round every model runs
    ``repeats`` times, in an order that alternates between rounds (A B C, C B A, ...), so that
    clock-frequency, cache and load drifts hit all models alike. Threads are fixed for the whole
    measurement (``threads``, default: the current count) and restored afterwards. All models see
    the same input tensor.

    Returns ``{"models": {name: {"ms", "ms_rounds", "ms_median_all", "ms_min", ...}}, "ratios": {name:
    speed-up vs the first model}, "reference": first name, ...}``: ``ms_rounds`` holds the fastest run of
    each round (interference from other processes only ever adds time, so the per-round minimum is the
    robust estimate on a shared machine), ``ms`` is their median, ``ms_median_all`` the median of all
    timed runs and ``ms_min`` the fastest; ``ratios[name]`` is the median over rounds of ``reference
    ms_rounds / name ms_rounds`` (> 1: faster than the reference). Each ``models[name]`` also has the
    fields of :func:`measure_latency`.
    """
    if not models:
        raise ValueError("compare_latency needs at least one model")
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise ValueError("rounds and repeats must be >= 1, warmup >= 0")
    device = torch.device(device)
    names = list(models)
    modes = {n: m.training for n, m in models.items()}
    x = torch.randn(batch_size, *input_shape, device=device)
    runs = {n: _runner(m.eval(), x, device, dtype) for n, m in models.items()}
    timer = _timer(device)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    every: dict[str, list[float]] = {n: [] for n in names}
    try:
        with _Threads(threads) as n_threads:
            for n in names:
                for _ in range(warmup):
                    runs[n]()
            for r in range(rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    t = [timer(runs[n]) for _ in range(repeats)]
                    every[n] += t
                    per_round[n].append(min(t))
    finally:
        for n, m in models.items():
            m.train(modes[n])
    ref = names[0]
    common = {"batch": batch_size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "warmup": warmup, "repeats": rounds * repeats, "rounds": rounds, "threads": n_threads,
              "interleaved": True, "timer": "cuda-events" if device.type == "cuda" else "perf_counter"}
    out = {n: {"ms": statistics.median(per_round[n]), "ms_rounds": [round(v, 6) for v in per_round[n]],
               "ms_median_all": statistics.median(every[n]), "ms_min": min(every[n]), **common} for n in names}
    ratios = {n: round_ratio(per_round[ref], per_round[n]) for n in names}
    return {"models": out, "ratios": ratios, "reference": ref, **common}


def profile_model(model: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                  batches: tuple[int, ...] = (1, 64), latency: bool = True, repeats: int = 10) -> dict:
    """Params, MACs, bytes and (optionally) latency at each batch size, as one JSON-ready dict."""
    out = {"params": count_params(model), "macs": count_macs(model, input_shape), "bytes": state_bytes(model),
           "input_shape": list(input_shape)}
    if latency:
        out["latency"] = {str(b): measure_latency(model, input_shape, b, device, repeats=repeats) for b in batches}
    return out
