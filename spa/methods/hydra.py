"""Hydra: a parallel low-rank branch plus a linear sequential low-rank branch, still fusible.

``y = W x + B_p A_p x + M (W x + b)`` with ``M = diag(m_out) B_s A_s diag(m_out)`` acting on the
layer's output channels. Fuse rule::

    W' = (m_out m_inᵀ) ⊙ (W + B_p A_p·e_c + M W),   b' = m_out ⊙ (b + M b)

(``M W`` mixes whole output filters, which is exact for a convolution too). ``A_s`` reads the
output space and is masked by ``m_out`` (storage ∝ kept channels; a pruned channel has no
effect). Both up-projections start at zero, so the layer starts at the source function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spa.methods.splora import SPLoRAConfig, SPLoRALayer


@dataclass
class HydraConfig(SPLoRAConfig):
    """Hydra options: ``rank`` of the parallel branch, ``seq_rank`` of the sequential one (``None`` = rank)."""

    seq_rank: int | None = None


class HydraLayer(SPLoRALayer):
    """SPLoRA's parallel branch plus a sequential low-rank output mixing ``B_s A_s``."""

    method = "hydra"

    def __init__(self, base: nn.Module, cfg: HydraConfig):
        super().__init__(base, cfg)
        r = cfg.seq_rank or cfg.rank
        self.seq_A = nn.Parameter(torch.empty(r, self.out_channels, dtype=self.weight.dtype))
        self.seq_B = nn.Parameter(torch.zeros(self.out_channels, r, dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.seq_A, a=math.sqrt(5))

    def mixing(self) -> torch.Tensor:
        """``M = diag(m_out) B_s A_s diag(m_out)`` (out × out)."""
        return (self.out_mask[:, None] * self.seq_B) @ (self.seq_A * self.out_mask[None, :])

    def delta(self):
        m = self.mixing()
        dw = self.centre(self.lora_B @ self.lora_A) + torch.einsum("oc,c...->o...", m, self.weight)
        db = None if self.bias is None else m @ self.bias
        return dw, db

    def factor_dims(self):
        return {**super().factor_dims(), "seq_A": (None, "out"), "seq_B": ("out", None)}
