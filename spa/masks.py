"""Channel masks shared along dependency groups, and the pruning criteria on fused weights.

A mask is kept per dependency group (one bool per root channel); every coupled layer dimension
of the group follows it (:func:`spa.prune.layer_masks`). The default criterion (``l2``) scores a
root channel by the L2 norm of the *fused* (source + adapter) weights of every adapted layer
dimension coupled to it, so what the task has learned decides what is pruned. ``functional``
(:func:`functional_importance`) is ``metaprune prune``'s free functional criterion on the fused
weights; ``random`` (:func:`random_importance`) a seeded random ranking (a baseline); ``gate`` the ranking
optimised on data at each step (:mod:`spa.gate`).
"""

from __future__ import annotations

import torch
from torch import nn

from metaprune.errors import ConfigError
from spa.methods.base import AdaptedLayer
from spa.prune import ChannelGroup

CRITERIA = ("l2", "functional", "random", "gate")
"""Channel criteria of ``metaprune adapt`` (:class:`spa.api.AdaptConfig` ``criterion``); ``gate`` learns its
ranking on training batches at every step (:mod:`spa.gate`), the others are computed from the weights."""

_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def check_criterion(name) -> str:
    """``name`` if it is one of :data:`CRITERIA`, else :class:`ConfigError` saying what is available."""
    if name in CRITERIA:
        return name
    prune_only = ("l1", "bn", "taylor", "metanet")
    if name in prune_only:
        raise ConfigError(f"criterion {name!r} is available for `metaprune prune` / `curve` only; "
                          f"`metaprune adapt` prunes by {', '.join(CRITERIA)}")
    raise ConfigError(f"unknown adapt criterion {name!r}; use one of {', '.join(CRITERIA)}")


def _unit(values: torch.Tensor, mem, size: int) -> torch.Tensor:
    """Per-unit sums of per-channel ``values`` of member ``mem`` (:meth:`spa.prune.Member.unit_index`)."""
    return torch.zeros(size, dtype=torch.float64).index_add_(0, mem.unit_index(size), values)


def _normed(v: torch.Tensor) -> torch.Tensor:
    return v / max(float(v.mean()), 1e-12)


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
        score.index_add_(0, mem.unit_index(group.size), vals / max(float(vals.mean()), 1e-12))
    return score.sqrt()


@torch.no_grad()
def functional_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``||(gamma, beta)|| x ||fused input columns of the consumers||`` per unit (``metaprune prune``'s ``functional``).

    Producer factor: over the group's normalisation members (BatchNorm, LayerNorm, GroupNorm
    weights and biases), ``||(gamma_c, beta_c)||_2`` per unit; in a group without one, over its
    conv / linear ``"out"`` members, ``||(w_c, b_c)||_2`` of the fused output rows. Consumer factor:
    over the ``"in"`` members, ``||W[:, c]||_2`` of the fused input columns (1 when there is none).
    Per unit, a member's channels are combined as one vector (a head's channels, a flatten's
    positions); every member's per-unit norms are divided by their mean before members are summed,
    as :func:`group_importance` does, so members of different sizes combine.
    """
    mods = dict(model.named_modules())
    size = group.size
    norm_p = torch.zeros(size, dtype=torch.float64)
    lin_p = torch.zeros(size, dtype=torch.float64)
    cons = torch.zeros(size, dtype=torch.float64)
    has_norm = has_cons = False
    for mem in group.members:
        m = mods[mem.name]
        idx = torch.tensor(mem.idxs, dtype=torch.long)
        if not len(idx):
            continue
        if isinstance(m, _NORM_LAYERS):
            if mem.dim != "out" or getattr(m, "weight", None) is None:
                continue
            sq = m.weight.detach().double().cpu()[idx] ** 2
            if getattr(m, "bias", None) is not None:
                sq = sq + m.bias.detach().double().cpu()[idx] ** 2
            norm_p += _normed(_unit(sq, mem, size).sqrt())
            has_norm = True
            continue
        if isinstance(m, AdaptedLayer):
            w, b = m.fused()
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and mem.dim == "out":
            w, b = m.weight, m.bias
        else:
            continue
        w = w.detach().double().cpu()
        if mem.dim == "out":
            sq = (w.flatten(1) ** 2).sum(1)
            if b is not None:
                sq = sq + b.detach().double().cpu() ** 2
            lin_p += _normed(_unit(sq[idx], mem, size).sqrt())
        else:
            sq = (w.transpose(0, 1).flatten(1) ** 2).sum(1)
            cons += _normed(_unit(sq[idx], mem, size).sqrt())
            has_cons = True
    score = (norm_p if has_norm else lin_p) * (cons if has_cons else 1.0)
    if not bool(torch.isfinite(score).all()) or float(score.sum()) <= 0:
        return torch.ones(size, dtype=torch.float64)
    return score


def random_importance(group: ChannelGroup, seed: int) -> torch.Tensor:
    """A seeded random permutation of ``1..size`` (the group's root name is mixed in: groups differ)."""
    key = sum((i + 1) * ord(c) for i, c in enumerate(group.root)) % (2 ** 31)
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + key) % (2 ** 63))
    return (torch.randperm(group.size, generator=gen) + 1).double()


def importance(model: nn.Module, group: ChannelGroup, criterion: str = "l2", seed: int = 0) -> torch.Tensor:
    """Per-unit scores of ``group`` by ``criterion`` (:data:`CRITERIA`); higher is kept longer."""
    check_criterion(criterion)
    if criterion == "gate":
        raise ConfigError("criterion 'gate' learns its ranking on data: spa.gate.gate_step_keep, not importance()")
    if criterion == "functional":
        return functional_importance(model, group)
    if criterion == "random":
        return random_importance(group, seed)
    return group_importance(model, group)


def current_keep(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """The group's kept units (bool, one per root channel or head), read from the root layer's ``out_mask``."""
    root = dict(model.named_modules())[group.root]
    rows = torch.tensor(group.root_idxs(), dtype=torch.long)
    kept = root.out_mask.detach().cpu()[rows] > 0
    return kept.view(-1, group.size).all(0)


def keep_count(size: int, ratio: float) -> int:
    """Units (channels or heads) a group of ``size`` keeps when ``ratio`` of it is pruned (at least one)."""
    return max(1, round(size * (1.0 - ratio)))


def step_keep(model: nn.Module, groups: list[ChannelGroup], ratio: float, criterion: str = "l2",
              seed: int = 0) -> dict[str, torch.Tensor]:
    """New kept-channel masks with ``ratio`` of each group's channels pruned (at least one kept).

    Already-pruned channels stay pruned; among the kept ones the lowest-scoring by ``criterion``
    (:func:`importance`; ``seed`` for ``random``) go first.
    """
    check_criterion(criterion)
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        keep = current_keep(model, g).clone()
        target = keep_count(g.size, ratio)
        if int(keep.sum()) > target:
            score = importance(model, g, criterion, seed).clone()
            score[~keep] = float("inf")
            order = torch.argsort(score)  # ascending; pruned channels last
            n_drop = int(keep.sum()) - target
            keep[order[:n_drop]] = False
        out[g.root] = keep
    return out
