"""LoRA: the plain, unpruned low-rank reference (``W' = W + (alpha / r) B A``).

Same factors and centre-tap placement as SPLoRA plus the usual ``alpha / r`` scale; it is meant
for ``ratio = 0`` (no channel pruning) as the reference point of the SPA comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from spa.methods.splora import SPLoRAConfig, SPLoRALayer


@dataclass
class LoRAConfig(SPLoRAConfig):
    """LoRA options: ``rank`` and ``alpha`` (scale ``alpha / rank``; ``None`` = ``rank``, scale 1)."""

    alpha: float | None = None


class LoRALayer(SPLoRALayer):
    """A low-rank parallel update scaled by ``alpha / rank``."""

    method = "lora"

    def __init__(self, base: nn.Module, cfg: LoRAConfig):
        super().__init__(base, cfg)
        self.scale = (cfg.alpha if cfg.alpha is not None else cfg.rank) / cfg.rank
