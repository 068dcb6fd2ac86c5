"""SPLoRA: a structured-pruning low-rank adapter.

Fuse rule: ``W' = (m_out m_inᵀ) ⊙ (W + B A)`` with ``A`` (rank × in, the down-projection) and
``B`` (out × rank, the up-projection, zero-initialised so the layer starts exactly at the source
function); on a convolution ``B A`` sits on the kernel's centre tap (a parallel pointwise
low-rank conv). No ``alpha/r`` scaling. Because the mask is a rank-1 outer product, pruning
channels is slicing rows of ``B`` and columns of ``A``; the rank is never pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spa.methods.base import AdaptedLayer, MethodConfig


@dataclass
class SPLoRAConfig(MethodConfig):
    """SPLoRA options: ``rank`` of every adapted layer."""


class SPLoRALayer(AdaptedLayer):
    """Conv2d (odd square kernel, centre tap) or Linear (incl. attention ``qkv``/``proj``) with ``B A``."""

    method = "splora"
    scale = 1.0

    def __init__(self, base: nn.Module, cfg: SPLoRAConfig):
        super().__init__(base)
        if self.kind == "conv" and any(k % 2 == 0 for k in self.kernel_size):
            from metaprune.errors import ConfigError

            raise ConfigError(f"kernel {self.kernel_size} has no centre tap; SPLoRA needs odd kernels")
        r = cfg.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_channels, dtype=self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_channels, r, dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self):
        return self.centre(self.scale * (self.lora_B @ self.lora_A)), None

    def factor_dims(self):
        return {"lora_A": (None, "in"), "lora_B": ("out", None)}
