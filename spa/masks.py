"""Channel masks shared along dependency groups, and the pruning criterion on fused weights.

A mask is kept per dependency group (one bool per root channel); every coupled layer dimension
of the group follows it (:func:`spa.prune.layer_masks`). The criterion scores a root channel by
the L2 norm of the *fused* (source + adapter) weights of every adapted layer dimension coupled to
it, so what the task has learned decides what is pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from spa.methods.base import AdaptedLayer
from spa.prune import ChannelGroup


@torch.no_grad()
def group_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per-root-channel importance: sqrt of the summed squared fused-weight norms of the group's members."""
    mods = dict(model.named_modules())
    score = torch.zeros(group.size, dtype=torch.float64)
    for mem in group.members:
        m = mods[mem.name]
        if not isinstance(m, AdaptedLayer):
            continue
        w, _ = m.fused()
        w = w.detach().double().cpu()
        per = (w.flatten(1) ** 2).sum(1) if mem.dim == "out" else (w.transpose(0, 1).flatten(1) ** 2).sum(1)
        idx = torch.tensor(mem.idxs, dtype=torch.long)
        vals = per[idx]
        score.index_add_(0, torch.arange(len(mem.idxs)) % group.size, vals / max(float(vals.mean()), 1e-12))
    return score.sqrt()


def current_keep(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """The group's kept units (bool, one per root channel or head), read from the root layer's ``out_mask``."""
    root = dict(model.named_modules())[group.root]
    rows = torch.tensor(group.root_idxs(), dtype=torch.long)
    kept = root.out_mask.detach().cpu()[rows] > 0
    return kept.view(-1, group.size).all(0)


def step_keep(model: nn.Module, groups: list[ChannelGroup], ratio: float) -> dict[str, torch.Tensor]:
    """New kept-channel masks with ``ratio`` of each group's channels pruned (at least one kept).

    Already-pruned channels stay pruned; among the kept ones the lowest-importance go first.
    """
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        keep = current_keep(model, g).clone()
        target = max(1, round(g.size * (1.0 - ratio)))
        if int(keep.sum()) > target:
            score = group_importance(model, g)
            score[~keep] = float("inf")
            order = torch.argsort(score)  # ascending; pruned channels last
            n_drop = int(keep.sum()) - target
            keep[order[:n_drop]] = False
        out[g.root] = keep
    return out
