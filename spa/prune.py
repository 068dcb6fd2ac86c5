"""Torch-Pruning integration: one handler for every adapted layer, dependency groups, masks.

:class:`AdaptedLayerPruner` slices the frozen base weight, bias, masks and the method's adapter
factors together (out channels: rows of ``W``/``B``/``P``; in channels: columns of ``W``/``A``/
``P``), so torch-pruning's DepGraph treats an adapted layer like the plain layer it replaces.
:func:`channel_groups` lists the prunable dependency groups of an adapted model;
:func:`physically_prune` removes masked channels for real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import PruningError
from spa.methods.base import AdaptedLayer


class AdaptedLayerPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler for :class:`AdaptedLayer` (every method: base and adapter pruned together)."""

    def _keep(self, n: int, idxs: Sequence[int]) -> torch.Tensor:
        drop = set(int(i) for i in idxs)
        return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)

    def prune_out_channels(self, layer: AdaptedLayer, idxs: Sequence[int]) -> nn.Module:
        layer.keep_channels("out", self._keep(layer.out_channels, idxs))
        return layer

    def prune_in_channels(self, layer: AdaptedLayer, idxs: Sequence[int]) -> nn.Module:
        layer.keep_channels("in", self._keep(layer.in_channels, idxs))
        return layer

    def get_out_channels(self, layer: AdaptedLayer) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: AdaptedLayer) -> int:
        return layer.in_channels


PRUNER = AdaptedLayerPruner()
CUSTOM_PRUNERS = {AdaptedLayer: PRUNER}


def _custom_pruners(model: nn.Module) -> dict:
    # torch-pruning matches handlers by exact type, so register every subclass present
    return {type(m): PRUNER for m in model.modules() if isinstance(m, AdaptedLayer)}


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """DepGraph of an adapted model, with :class:`AdaptedLayerPruner` for every adapted layer."""
    was = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                   customized_pruners=_custom_pruners(model))
    except Exception as e:  # noqa: BLE001 - torch-pruning raises assorted errors on untraceable models
        raise PruningError(f"torch-pruning could not trace the adapted model ({type(e).__name__}: {e})") from None
    finally:
        model.train(was)
    return dg


@dataclass
class Member:
    """One layer dimension in a dependency group: module path, ``"out"`` or ``"in"``, and its index map."""

    name: str
    dim: str
    idxs: list[int]


@dataclass
class ChannelGroup:
    """A prunable dependency group: the root (an adapted layer's out channels) and every coupled layer dim.

    ``members[i].idxs[j]`` is the channel of that layer dimension that moves with root channel ``j``.
    """

    root: str
    size: int
    members: list[Member]


def _dim_of(handler, dep_target) -> str | None:
    fn = getattr(handler, "__name__", "")
    if "out_channels" in fn:
        return "out"
    if "in_channels" in fn:
        return "in"
    return None


def channel_groups(model: nn.Module, dg: tp.DependencyGraph, head: nn.Module | None) -> list[ChannelGroup]:
    """The prunable dependency groups rooted at adapted layers (the head's outputs are never pruned)."""
    names = {m: n for n, m in model.named_modules()}
    groups: list[ChannelGroup] = []
    ignored = [head] if head is not None else []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[AdaptedLayer]):
        root_mod = group[0].dep.target.module
        n = dg.get_out_channels(root_mod)
        full = dg.get_pruning_group(root_mod, PRUNER.prune_out_channels, list(range(n)))
        members: list[Member] = []
        ok = True
        for item in full:
            dep, idxs = item.dep, item.idxs
            m = dep.target.module
            if m not in names:
                continue
            dim = _dim_of(dep.handler, m)
            if dim is None:
                continue
            if m is head and dim == "out":
                ok = False
            members.append(Member(names[m], dim, [int(i) for i in idxs]))
        if ok and n > 1:
            groups.append(ChannelGroup(names[root_mod], n, members))
    return groups


def layer_masks(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per-layer masks ``{name: {"out"|"in": bool tensor}}`` from per-group kept-root-channel masks."""
    mods = dict(model.named_modules())
    out: dict[str, dict] = {}
    for g in groups:
        k = keep[g.root]
        for mem in g.members:
            m = mods[mem.name]
            size = _dim_size(m, mem.dim)
            masks = out.setdefault(mem.name, {})
            mask = masks.get(mem.dim)
            if mask is None:
                mask = torch.ones(size, dtype=torch.bool)
            idx = torch.tensor(mem.idxs, dtype=torch.long)
            root_ch = torch.arange(len(mem.idxs)) % g.size
            mask[idx] = mask[idx] & k[root_ch]
            masks[mem.dim] = mask
    return out


def _dim_size(m: nn.Module, dim: str) -> int:
    if isinstance(m, AdaptedLayer):
        return m.out_channels if dim == "out" else m.in_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels if dim == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if dim == "out" else m.in_features
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0]
    raise PruningError(f"cannot mask a {type(m).__name__}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, dict]) -> None:
    """Write per-layer masks into the adapted layers' ``out_mask`` / ``in_mask`` buffers."""
    mods = dict(model.named_modules())
    for name, mm in masks.items():
        m = mods.get(name)
        if isinstance(m, AdaptedLayer):
            for dim, mask in mm.items():
                getattr(m, f"{dim}_mask").copy_(mask.to(m.weight.dtype))


@torch.no_grad()
def physically_prune(model: nn.Module, dg: tp.DependencyGraph, groups: list[ChannelGroup]) -> None:
    """Remove every channel whose root mask is 0, with torch-pruning (base + adapters together)."""
    mods = dict(model.named_modules())
    for g in groups:
        root = mods[g.root]
        drop = (root.out_mask == 0).nonzero().flatten().tolist()
        if not drop:
            continue
        if len(drop) >= root.out_channels:
            raise PruningError(f"group {g.root} would lose every channel")
        group = dg.get_pruning_group(root, PRUNER.prune_out_channels, drop)
        group.prune()
