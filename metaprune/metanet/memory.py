"""Give freed heap memory back to the operating system between metanetwork layers.

PyTorch's CPU tensors come from the C allocator. With glibc, large freed blocks that are not at
the top of the heap stay resident, so a forward/backward pass that frees tens of MB of
transients per layer while keeping one edge-state tensor per layer grows its RSS by several times
what it actually holds (ResNet-56 graph, hidden 64, 8 layers, edge chunks of 25k: about
+1.2 GB resident for about 0.25 GB live). ``malloc_trim(0)`` returns those free pages; it changes
no tensor. Elsewhere (not glibc, or another allocator preloaded) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from torch import Tensor


@functools.lru_cache(maxsize=1)
def _trim_fn():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    return fn


def release_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    fn = _trim_fn()
    if fn is not None:
        fn(0)


def release_in_backward(t: Tensor) -> Tensor:
    """``t`` with a hook that releases free memory when its gradient arrives (between layers' backward)."""
    if t.requires_grad:
        def hook(g: Tensor) -> Tensor:
            release_memory()
            return g

        t.register_hook(hook)
    return t
