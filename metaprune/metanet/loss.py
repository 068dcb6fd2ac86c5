"""The meta-training loss: cross-entropy of the edited network + DepGraph-style group sparsity.

The sparsity term is written as an explicit, differentiable loss on a parameter dict (the
output of :func:`metaprune.graph.graph_params`), not as a gradient hook. Once per network
structure, torch-pruning's :class:`DependencyGraph` gives the coupled channel groups; for each
group we keep index lists ``(state-dict key, dim, channel idxs, root idxs)`` of every coupled
slice (conv / linear output rows and input columns, BatchNorm weights and biases). The loss is

    S(theta) = sum_g sum_c gamma_{g,c} * ||theta_{g,c}||^2,
    gamma_{g,c} = alpha ** ((s_max - s_c) / (s_max - s_min)),  s = sqrt(mean-normalised importance)

with ``gamma`` treated as a constant (recomputed from the current weights every step), which is
the objective whose gradient DepGraph's ``GroupNormPruner.regularize`` adds by hand
(``mode="depgraph"``).

``mode="functional"`` keeps only what a channel's *function* depends on once BatchNorm
statistics are re-estimated (batch statistics in meta-training, recalibration after an edit):

    S_f(theta) = sum_g sum_c gamma_{g,c} * sum_{s in slices(g), s not scale-free} ||theta_{s,c}||^2 / M_s
    M_s = mean_c ||theta_{s,c}||^2   (the slice's current mean, differentiable)

A conv/linear output slice that feeds a BatchNorm is *scale-free*: BN undoes any per-channel
scaling of it, so shrinking it costs no accuracy and removes nothing; it is left out. Dividing
each slice by its own current mean makes the term invariant to scaling a whole slice (which BN
undoes for slices feeding it, and which is meaningless for a ranking anyway), so the only way to lower it is to move norm from the channels ``gamma`` marks as
unimportant to the others -- in BN affine weights and in the consumers' input columns, i.e. to
make those channels really removable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

_OUT = ("prune_out_channels",)
_IN = ("prune_in_channels",)


@dataclass
class Slice:
    """One coupled slice of a group: ``params[key].index_select(dim, idxs)`` maps to root channels ``root``."""

    key: str
    dim: int
    idxs: Tensor
    root: Tensor
    scale_free: bool = False
    gate: bool = False


@dataclass
class Group:
    """A dependency group: ``size`` root channels and the slices coupled to them."""

    size: int
    slices: list[Slice]


def dependency_groups(model: nn.Module, input_shape: tuple[int, ...], ignore_classifier: bool = True) -> list[Group]:
    """Index lists of the prunable channel groups of ``model`` (torch-pruning's DependencyGraph)."""
    from metaprune.pruning.structure import find_classifier

    device = next(model.parameters()).device
    was = model.training
    names = {m: n for n, m in model.named_modules()}
    ignored = [find_classifier(model)[1]] if ignore_classifier else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, *input_shape, device=device))
        raw = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
    bn_fed = {mod for mod, node in dg.module2node.items() if isinstance(mod, (nn.Conv2d, nn.Linear))
              and node.outputs and all(isinstance(o.module, nn.modules.batchnorm._BatchNorm) for o in node.outputs)}
    model.train(was)
    out: list[Group] = []
    for g in raw:
        slices: list[Slice] = []
        size = len(g[0].idxs)
        for item in g:
            mod = item.dep.target.module
            fn = getattr(item.dep.handler, "__name__", "")
            name = names.get(mod)
            if name is None:
                continue
            idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
            root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
            prefix = f"{name}." if name else ""
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if fn in _OUT:
                    free = mod in bn_fed
                    slices.append(Slice(prefix + "weight", 0, idxs, root, free, gate=not free))
                    if mod.bias is not None:
                        slices.append(Slice(prefix + "bias", 0, idxs, root, free, gate=not free))
                elif fn in _IN and getattr(mod, "groups", 1) == 1:
                    slices.append(Slice(prefix + "weight", 1, idxs, root))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and fn in _OUT and mod.affine:
                slices.append(Slice(prefix + "weight", 0, idxs, root, gate=True))
                slices.append(Slice(prefix + "bias", 0, idxs, root, gate=True))
        if slices:
            out.append(Group(size, slices))
    return out


def _slice_sq(params: dict[str, Tensor], s: Slice) -> Tensor:
    """Squared norm of each channel of one coupled slice: ``[len(s.idxs)]``."""
    w = params[s.key]
    w = w.movedim(s.dim, 0) if s.dim else w
    return w.index_select(0, s.idxs.to(w.device)).reshape(len(s.idxs), -1).pow(2).sum(1)


def channel_sq_norms(params: dict[str, Tensor], group: Group, functional: bool = False) -> tuple[Tensor, Tensor]:
    """Per root channel: the summed squared norm over the group's slices and the number of slices.

    With ``functional`` scale-free slices are skipped and every other slice is divided by its
    current mean channel norm (see the module doc).
    """
    dev = next(iter(params.values())).device
    total = torch.zeros(group.size, device=dev)
    count = torch.zeros(group.size, device=dev)
    for s in group.slices:
        if functional and s.scale_free:
            continue
        sq = _slice_sq(params, s)
        if functional:
            sq = sq / sq.mean().clamp_min(1e-12)
        total = total.index_add(0, s.root.to(dev), sq)
        count = count.index_add(0, s.root.to(dev), torch.ones_like(sq))
    return total, count


SPARSITY_MODES = ("depgraph", "functional")


def group_sparsity(params: dict[str, Tensor], groups: list[Group], alpha: float = 16.0,
                   mode: str = "depgraph") -> Tensor:
    """Polarised group sparsity ``sum gamma * ||theta_{g,c}||^2``: DepGraph's (``mode="depgraph"``)
    or its BN-aware, scale-invariant variant (``mode="functional"``); see the module doc."""
    if mode not in SPARSITY_MODES:
        raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {SPARSITY_MODES}")
    loss = None
    functional = mode == "functional"
    for g in groups:
        if functional and all(s.scale_free for s in g.slices):
            continue
        sq, cnt = channel_sq_norms(params, g, functional=functional)
        with torch.no_grad():
            imp = sq / cnt.clamp_min(1)
            imp = imp / imp.max().clamp_min(1e-12)
            s = imp.sqrt()
            span = (s.max() - s.min()).clamp_min(1e-12)
            gamma = alpha ** ((s.max() - s) / span)
        term = (gamma * sq).sum()
        loss = term if loss is None else loss + term
    if loss is None:
        return torch.zeros((), device=next(iter(params.values())).device)
    return loss


def criterion_norms(params: dict[str, Tensor], group: Group) -> Tensor:
    """Per root channel, the L2 magnitude torch-pruning's ``GroupMagnitudeImportance(p=2)`` ranks
    channels by: the summed squared weights of every coupled slice (biases excluded)."""
    dev = next(iter(params.values())).device
    total = torch.zeros(group.size, device=dev)
    for s in group.slices:
        if not s.key.endswith(".bias"):
            total = total.index_add(0, s.root.to(dev), _slice_sq(params, s))
    return total


def soft_prune(params: dict[str, Tensor], groups: list[Group], ratio: float,
               temperature: float = 0.1, straight_through: bool = False) -> dict[str, Tensor]:
    """``params`` with the ``ratio`` least important channels of every group (by
    :func:`criterion_norms`, as uniform L2 pruning would pick them) softly switched off.

    Every channel gets a gate ``sigmoid((n_c - t) / (temperature * median(n)))`` on its norm
    ``n_c``, with the threshold ``t`` halfway between the last pruned and the first kept channel
    (detached). The gate multiplies what produces the channel (BatchNorm weight and bias, or the
    output rows of a layer not followed by BatchNorm), so a gate of 0 is exactly the pruned
    network and the gradient reaches both the kept weights and the norms that decide the ranking.
    With ``straight_through`` the forward pass uses hard 0/1 gates (exactly the uniformly pruned
    network) and the backward pass the soft gates' gradient.
    """
    if not 0 <= ratio < 1:
        raise ValueError("soft_prune ratio must be in [0, 1)")
    out = dict(params)
    for g in groups:
        k = g.size - max(1, int(g.size * (1 - ratio)))  # as torch-pruning: keep int(n * (1 - ratio)), >= 1
        if k < 1 or not any(s.gate for s in g.slices):
            continue
        n = criterion_norms(params, g).clamp_min(1e-12).sqrt()
        with torch.no_grad():
            srt, order = n.sort()
            t = 0.5 * (srt[k - 1] + srt[k])
            tau = temperature * srt.median().clamp_min(1e-12)
        gate = torch.sigmoid((n - t) / tau)
        if straight_through:  # exactly k channels off, also when norms tie at the threshold
            hard = torch.ones_like(gate).index_fill(0, order[:k], 0.0)
            gate = hard + gate - gate.detach()
        for s in g.slices:
            if not s.gate:
                continue
            w = out[s.key]
            scale = torch.ones(w.shape[s.dim], device=w.device, dtype=w.dtype)
            scale = scale.index_put((s.idxs.to(w.device),), gate.index_select(0, s.root.to(w.device)).to(w.dtype))
            shape = [1] * w.dim()
            shape[s.dim] = -1
            out[s.key] = w * scale.view(shape)
    return out
