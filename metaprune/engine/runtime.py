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


def _local_processes() -> tuple[int, int]:
    """(LOCAL_RANK, processes on this machine) as torchrun sets them (0, 1 without torchrun)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    return local_rank, local_world


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device a command runs on, checked before any work.

    ``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is present, else CPU. ``cuda`` -> ``cuda:LOCAL_RANK`` (under
    torchrun each process takes its own GPU; ``cuda:0`` without torchrun). ``cuda:N`` names one GPU and is
    refused when several processes run on this machine (they would all share GPU N). ``cpu`` takes no index
    other than 0. Anything else, or a CUDA device that is not visible, raises :class:`ConfigError`.
    """
    local_rank, local_world = _local_processes()
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return _check_cuda_index(local_rank, "auto")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ConfigError(f"--device {device}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"--device {device}: unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if dev.index is None:
        return _check_cuda_index(local_rank, str(device))
    if local_world > 1:
        raise ConfigError(f"--device {device} with {local_world} processes on this machine would put every process "
                          "on the same GPU; use --device cuda (process i takes cuda:LOCAL_RANK) and choose the GPUs "
                          "with CUDA_VISIBLE_DEVICES")
    return _check_cuda_index(dev.index, str(device))


def _check_cuda_index(index: int, asked: str) -> torch.device:
    n = torch.cuda.device_count()
    if not 0 <= index < n:
        raise ConfigError(f"--device {asked}: CUDA device {index} is not visible (only {n} device(s)); "
                          f"use an index below {n}, or start at most {n} processes per machine under torchrun")
    return torch.device("cuda", index)


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
            if device.index is None:  # a bare "cuda": this process's own GPU
                device = torch.device("cuda", _local_processes()[0])
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity without a process group)."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_process(flag: bool, device: torch.device, distributed: bool) -> bool:
    """Whether ``flag`` holds on any process (every process gets the same answer)."""
    if not distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


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
