"""The ``gate`` criterion of ``metaprune adapt``: at every pruning step, a channel ranking optimised on data.

The same optimisation as ``metaprune prune --criterion gate`` (:func:`metaprune.pruning.gate.optimise_gates`:
one score per unit of every dependency group, hard top-k gates on the group's consumer inputs at a removal
ratio drawn from ``[0.95 r, r]``, straight-through sigmoid gradient, KL divergence from the current model's
own predictions, cosine-decayed Adam), run on the adapted model as it stands at the step (source + adapters
frozen for it, BatchNorm on batch statistics): units pruned at earlier steps stay pruned, and the step keeps
the best-scoring ``max(1, round(size x (1 - r)))`` units of each group, as the other criteria do.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from metaprune.engine.runtime import broadcast_object, get_world_size
from metaprune.pruning.config import PruneConfig
from metaprune.pruning.gate import _Group, gate_ratio_range, gate_stats, optimise_gates
from spa.masks import current_keep, functional_importance, keep_count
from spa.methods.base import AdaptedLayer
from spa.prune import ChannelGroup


def gate_groups(model: nn.Module, groups: list[ChannelGroup]) -> list[_Group]:
    """The gate's view of spa's dependency groups: one score per unit, gates on the adapted consumers' inputs.

    Masking a group's consumer inputs is its removal (spa keeps only groups where it is,
    :func:`spa.prune.channel_groups`); a group no adapted layer reads keeps its functional scores.
    """
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        consumers = [(mem.name, torch.tensor(mem.idxs, dtype=torch.long), mem.unit_index(g.size))
                     for mem in g.members if mem.dim == "in" and isinstance(mods[mem.name], AdaptedLayer)]
        gg = _Group(g.root, g.size, g.size, torch.arange(g.size), consumers, g.attention is not None)
        if not consumers:
            gg.fixed = functional_importance(model, g).float()
        out.append(gg)
    return out


def gate_step_keep(model: nn.Module, groups: list[ChannelGroup], ratio: float, batches, steps: int, lr: float,
                   seed: int = 0, desc: str = "gate") -> tuple[dict[str, torch.Tensor], dict]:
    """Kept units per group after a pruning step to ``ratio`` chosen by the gate (already-pruned units stay out).

    ``batches``: training ``(x, y)`` batches (cycled). Returns ``({group root: bool keep}, gate statistics)``;
    under torchrun every process gets rank 0's masks.
    """
    t0 = time.perf_counter()
    alive = [current_keep(model, g) for g in groups]
    ggroups = gate_groups(model, groups)
    band = gate_ratio_range(PruneConfig(ratio=ratio))  # prune's band for an explicit ratio: [0.95 r, r]
    scores, losses = optimise_gates(model, ggroups, batches, steps, band, lr, seed=seed,
                                    removed=[~a for a in alive], desc=desc, keep_count=keep_count)
    keep: dict[str, torch.Tensor] = {}
    for g, a, s in zip(groups, alive, scores):
        target = min(int(a.sum()), keep_count(g.size, ratio))
        k = torch.zeros(g.size, dtype=torch.bool)
        k[torch.topk(s.double().masked_fill(~a, float("-inf")), target).indices] = True
        keep[g.root] = k
    if get_world_size() > 1:  # every process takes rank 0's masks (float ties on different GPUs must not split the model)
        keep = {k: torch.tensor(v, dtype=torch.bool) for k, v in broadcast_object({k: v.tolist() for k, v in keep.items()}).items()}
    return keep, gate_stats(losses, time.perf_counter() - t0, band, lr, len(ggroups), global_=False,
                            distill=True, cosine=True)
