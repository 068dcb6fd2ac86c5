"""Helpers shared by the spa tests."""

import torch
from torch import nn

from spa import adapt_model
from spa.methods import get_method


def trained_adapter(src: nn.Module, rank: int = 3, num_classes: int = 4, scale: float = 0.1, seed: int | None = None,
                    method: str = "splora") -> nn.Module:
    """``src`` adapted with ``method`` (eval mode), its trainable parameters moved by ``scale`` x N(0, 1) as if
    trained: fused weights differ from the source's, BatchNorm affine non-trivial (``seed``: reseed first)."""
    cfg_cls, _ = get_method(method)
    m = adapt_model(src.eval(), method, cfg_cls(rank=rank), num_classes=num_classes, seed=0).eval()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return m
