"""SPPaRA: a structured-pruning parallel residual adapter (convolutions only).

Fuse rule: ``W' = (m_out m_inᵀ) ⊙ (W + P·e_c)`` — a full-rank pointwise ``P`` (out × in,
zero-initialised) placed on the kernel's centre tap. Pruning slices ``P`` in both dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metaprune.errors import ConfigError
from spa.methods.base import AdaptedLayer, MethodConfig


@dataclass
class SPPaRAConfig(MethodConfig):
    """SPPaRA options (``rank`` is unused: ``P`` is full rank)."""


class SPPaRALayer(AdaptedLayer):
    """Conv2d with a parallel pointwise full-rank adapter ``P``."""

    method = "sppara"

    def __init__(self, base: nn.Module, cfg: SPPaRAConfig):
        super().__init__(base)
        if self.kind != "conv" or any(k % 2 == 0 for k in self.kernel_size):
            raise ConfigError("SPPaRA adapts convolutions with odd kernels only")
        self.para_P = nn.Parameter(torch.zeros(self.out_channels, self.in_channels, dtype=self.weight.dtype))

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        return isinstance(base, nn.Conv2d) and super().supports(base)

    def delta(self):
        return self.centre(self.para_P), None

    def factor_dims(self):
        return {"para_P": ("out", "in")}
