"""The meta-training loss: cross-entropy of the edited network + DepGraph-style group sparsity.

The sparsity term is written as an explicit, differentiable loss on a parameter dict (the
output of :func:`metaprune.graph.graph_params`), not as a gradient hook. Once per network
structure, torch-pruning's :class:`DependencyGraph` gives the coupled channel groups; for each
group we keep index lists ``(state-dict key, dim, channel idxs, root idxs)`` of every coupled
slice (conv / linear output rows and input columns, BatchNorm weights and biases). The loss is

    S(theta) = sum_g sum_c gamma_{g,c} * ||theta_{g,c}||^2,
    gamma_{g,c} = alpha ** ((s_max - s_c) / (s_max - s_min)),  s = sqrt(mean-normalised importance)

with ``gamma`` treated as a constant (recomputed from the current weights every step), which is
the objective whose gradient DepGraph's ``GroupNormPruner.regularize`` adds by hand.
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
                    slices.append(Slice(prefix + "weight", 0, idxs, root))
                    if mod.bias is not None:
                        slices.append(Slice(prefix + "bias", 0, idxs, root))
                elif fn in _IN and getattr(mod, "groups", 1) == 1:
                    slices.append(Slice(prefix + "weight", 1, idxs, root))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and fn in _OUT and mod.affine:
                slices.append(Slice(prefix + "weight", 0, idxs, root))
                slices.append(Slice(prefix + "bias", 0, idxs, root))
        if slices:
            out.append(Group(size, slices))
    return out


def channel_sq_norms(params: dict[str, Tensor], group: Group) -> tuple[Tensor, Tensor]:
    """Per root channel: the summed squared norm over the group's slices and the number of slices."""
    dev = next(iter(params.values())).device
    total = torch.zeros(group.size, device=dev)
    count = torch.zeros(group.size, device=dev)
    for s in group.slices:
        w = params[s.key]
        w = w.movedim(s.dim, 0) if s.dim else w
        sq = w.index_select(0, s.idxs.to(dev)).reshape(len(s.idxs), -1).pow(2).sum(1)
        total = total.index_add(0, s.root.to(dev), sq)
        count = count.index_add(0, s.root.to(dev), torch.ones_like(sq))
    return total, count


def group_sparsity(params: dict[str, Tensor], groups: list[Group], alpha: float = 16.0) -> Tensor:
    """DepGraph's polarised group-sparsity objective ``sum gamma * ||theta_{g,c}||^2`` (see module doc)."""
    loss = None
    for g in groups:
        sq, cnt = channel_sq_norms(params, g)
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
