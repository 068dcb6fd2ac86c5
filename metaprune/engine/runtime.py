"""Devices, seeds, progress bars and the distributed (torchrun) context."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metaprune.errors import ConfigError

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def progress(it: Iterable, desc: str = "", total: int | None = None, leave: bool = False, **kw):
    """A tqdm bar on stderr; off when stderr is not a terminal, with ``--quiet``, or on non-zero ranks."""
    disable = _QUIET or not sys.stderr.isatty() or get_rank() != 0 or os.environ.get("METAPRUNE_NO_PROGRESS")
    return tqdm(it, desc=desc, total=total, leave=leave, disable=bool(disable), file=sys.stderr,
                dynamic_ncols=True, **kw)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the local CUDA device when present, else CPU; ``cuda[:N]`` checks that it exists."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); ``deterministic`` also asks for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- distributed
def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return get_rank() == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU.

    Returns whether a process group is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity without a process group)."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Send a picklable Python object from rank 0 to every process."""
    if get_world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
