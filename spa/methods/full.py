"""``full``: no adapter, every weight of the layer is trained (the fine-pruning baseline).

Fuse rule: ``W' = (m_out m_inᵀ) ⊙ W`` with ``W`` itself learned.
"""

from __future__ import annotations

from dataclasses import dataclass

from spa.methods.base import FullLayer, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Fine-pruning options (``rank`` is unused)."""


FullAdaptLayer = FullLayer
