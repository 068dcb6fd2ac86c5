"""Torch-Pruning integration: one handler for every adapted layer, dependency groups, masks.

:class:`AdaptedLayerPruner` slices the frozen base weight, bias, masks and the method's adapter
factors together (out channels: rows of ``W``/``B``/``P``; in channels: columns of ``W``/``A``/
``P``), so torch-pruning's DepGraph treats an adapted layer like the plain layer it replaces.
:func:`channel_groups` lists the prunable dependency groups of an adapted model;
:func:`physically_prune` removes masked channels for real.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import PruningError
from metaprune.pruning.structure import unwrapped_parameters
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


def _unwrapped(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare parameters (class token, position embedding) for torch-pruning, adapted layers' own excluded."""
    own = {id(p) for m in model.modules() if isinstance(m, AdaptedLayer) for p in m.parameters()}
    return [(p, d) for p, d in unwrapped_parameters(model) if id(p) not in own]


class _Graph(tp.DependencyGraph):
    """DepGraph that knows adapted Linear layers on token sequences.

    torch-pruning switches off its 2-D/4-D flatten index mapping when an ``nn.Linear`` returns a
    3-D tensor (a transformer); an adapted linear is not an ``nn.Linear``, so without this the patch
    embedding's ``reshape`` of a ViT is taken for a flatten and tracing fails.
    """

    seq_linear = False

    def _trace(self, *args, **kwargs):
        out = super()._trace(*args, **kwargs)
        if self.seq_linear:
            self._2d_4d = False
        return out


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """DepGraph of an adapted model, with :class:`AdaptedLayerPruner` for every adapted layer.

    Every parameter is traced (the frozen source ones too: a ViT's patch embedding, class token and
    position embedding must be in the graph), bare parameters are declared with the dimension they
    are pruned on (:func:`metaprune.pruning.structure.unwrapped_parameters`), as the pruning engine does.
    """
    was = model.training
    model.eval()
    req = [(p, p.requires_grad) for p in model.parameters()]
    dg = _Graph()

    def seen(mod, _inp, out):
        if mod.kind == "linear" and isinstance(out, torch.Tensor) and out.dim() >= 3:
            dg.seq_linear = True

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, AdaptedLayer)]
    try:
        for p, _ in req:
            p.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg.build_dependency(model, example_inputs=example, customized_pruners=_custom_pruners(model),
                                unwrapped_parameters=_unwrapped(model), verbose=False)
    except Exception as e:  # noqa: BLE001 - torch-pruning raises assorted errors on untraceable models
        raise PruningError(f"torch-pruning could not trace the adapted model ({type(e).__name__}: {e})") from None
    finally:
        for h in hooks:
            h.remove()
        for p, r in req:
            p.requires_grad_(r)
        model.train(was)
    return dg


@dataclass
class Member:
    """One layer dimension in a dependency group: module path, ``"out"`` or ``"in"``, its index map and the
    group unit of every index (``units``; ``None``: position ``p`` belongs to unit ``p % size``)."""

    name: str
    dim: str
    idxs: list[int]
    units: list[int] | None = None

    def unit_index(self, size: int) -> torch.Tensor:
        """The group unit each of :attr:`idxs` moves with. A flatten after a spatial map feeds a consumer
        ``stride`` positions per channel, channel by channel, so the unit is torch-pruning's root index of
        the position, not its position modulo the group size."""
        if self.units is not None:
            return torch.tensor(self.units, dtype=torch.long)
        return torch.arange(len(self.idxs)) % size


@dataclass
class ChannelGroup:
    """A prunable dependency group: the root (an adapted layer's out channels) and every coupled layer dim.

    The group has ``size`` prunable units ("root channels"): ``members[i].idxs[j]`` is the channel
    of that layer dimension that moves with unit ``members[i].unit_index(size)[j]`` (torch-pruning's root
    index; for the root itself and for attention groups, ``j % size``). For a plain group a unit is one
    output channel of the root; for an attention group (``attention`` = the attention module's
    path) a unit is a whole head: the q, k and v rows of ``qkv`` and the ``proj`` columns of that head.
    """

    root: str
    size: int
    members: list[Member]
    attention: str | None = None

    def root_idxs(self) -> list[int]:
        """The root layer's output channels, unit of each = position modulo ``size``."""
        for mem in self.members:
            if mem.name == self.root and mem.dim == "out":
                return mem.idxs
        raise PruningError(f"dependency group {self.root} lists no output channels of its root")


def _dim_of(handler) -> str | None:
    fn = getattr(handler, "__name__", "")
    if "out_channels" in fn:
        return "out"
    if "in_channels" in fn:
        return "in"
    return None


def _attention_modules(model: nn.Module) -> dict[nn.Module, tuple[str, nn.Module]]:
    """``{qkv layer: (attention path, attention module)}`` for attention with whole-head pruning.

    Same contract as :func:`metaprune.pruning.structure.attention_layers` (a fused ``qkv`` linear,
    rows laid out ``[3, num_heads, head_dim]``, and an integer ``num_heads``), with the linears
    possibly adapted.
    """
    out = {}
    for name, m in model.named_modules():
        qkv, heads = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if isinstance(qkv, (nn.Linear, AdaptedLayer)) and isinstance(heads, int) and heads > 0:
            if not isinstance(qkv, AdaptedLayer) or qkv.kind == "linear":
                out[qkv] = (name, m)
    return out


def _maskable(m, dim: str) -> bool:
    """Whether masking (zeroing) channel c of this layer dimension equals removing it.

    Adapted layers mask both dimensions in their forward pass; a BatchNorm is per channel, so a
    masked producer plus masked consumers make it irrelevant; a plain conv/linear's output channel
    is irrelevant when every consumer masks it. LayerNorm / GroupNorm (statistics over all
    channels), bare parameters (class token, position embedding) and a plain layer's inputs are
    not: a group holding one keeps its full width (e.g. a ViT's residual stream).
    """
    if isinstance(m, AdaptedLayer):
        return True
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return dim == "out" and isinstance(m, (nn.Conv2d, nn.Linear))


def _members(group, names: dict) -> tuple[list[Member], bool]:
    """The group's module members (torch-pruning's traced ops skipped) and whether masking it is exact."""
    members: list[Member] = []
    ok = True
    for item in group:
        dep, idxs = item.dep, item.idxs
        m = dep.target.module
        dim = _dim_of(dep.handler)
        if isinstance(m, nn.Parameter):
            ok = False
            continue
        if m not in names or dim is None:
            continue  # an op traced by torch-pruning (reshape, add, ...), not a layer
        ok = ok and _maskable(m, dim)
        root = item.root_idxs
        units = None if root is None or any(r is None for r in root) else [int(r) for r in root]
        members.append(Member(names[m], dim, [int(i) for i in idxs], units))
    return members, ok


def _head_group(model: nn.Module, dg: tp.DependencyGraph, names: dict, qkv: AdaptedLayer, attn_name: str,
                attn: nn.Module) -> ChannelGroup | None:
    """One group whose units are the heads of ``attn`` (q, k, v rows of ``qkv`` + ``proj`` columns)."""
    h = attn.num_heads
    rows = qkv.out_channels
    if rows % (3 * h):
        raise PruningError(f"{attn_name}.qkv has {rows} outputs, not 3 x num_heads ({h}) x head_dim")
    hd = rows // (3 * h)
    per_head: list[dict[tuple[str, str], list[int]]] = []
    for k in range(h):
        idx = [s * h * hd + k * hd + d for s in range(3) for d in range(hd)]
        members, ok = _members(dg.get_pruning_group(qkv, PRUNER.prune_out_channels, idx), names)
        if not ok:
            return None
        d: dict[tuple[str, str], list[int]] = {}
        for mem in members:
            d.setdefault((mem.name, mem.dim), []).extend(mem.idxs)
        per_head.append(d)
    keys = list(per_head[0])
    if any(list(p) != keys or any(len(p[key]) != len(per_head[0][key]) for key in keys) for p in per_head):
        raise PruningError(f"the heads of {attn_name} are not coupled alike; cannot prune whole heads")
    members = []
    for key in keys:  # interleave: position t * h + k holds head k's t-th channel
        n = len(per_head[0][key])
        members.append(Member(key[0], key[1], [per_head[k][key][t] for t in range(n) for k in range(h)],
                              [k for _ in range(n) for k in range(h)]))
    return ChannelGroup(names[qkv], h, members, attention=attn_name)


def channel_groups(model: nn.Module, dg: tp.DependencyGraph, head: nn.Module | None) -> list[ChannelGroup]:
    """The prunable dependency groups rooted at adapted layers (the head's outputs are never pruned).

    Only groups whose masking is exactly their removal (:func:`_maskable`) are returned. Fused
    ``qkv`` attention layers give one group per attention layer whose units are whole heads (the
    head size and the attention scale are kept); a transformer's residual width (LayerNorm, class
    token, position embedding) is kept.
    """
    names = {m: n for n, m in model.named_modules()}
    attention = _attention_modules(model)
    groups: list[ChannelGroup] = []
    ignored = [head] if head is not None else []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[AdaptedLayer]):
        root_mod = group[0].dep.target.module
        if root_mod in attention:
            g = _head_group(model, dg, names, root_mod, *attention[root_mod])
            if g is not None and g.size > 1:
                groups.append(g)
            continue
        members, ok = _members(group, names)
        if any(names.get(head) == mem.name and mem.dim == "out" for mem in members):
            ok = False
        n = dg.get_out_channels(root_mod)
        if ok and n > 1:
            groups.append(ChannelGroup(names[root_mod], n, members))
    return groups


def layer_masks(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per-layer masks ``{name: {"out"|"in": bool tensor}}`` from per-group kept-unit masks.

    ``keep[g.root]`` has one bool per unit of the group (``g.size``: channels, or heads of an
    attention group), or is the root layer's whole output mask (a unit is kept when all its root
    channels are).
    """
    mods = dict(model.named_modules())
    out: dict[str, dict] = {}
    for g in groups:
        k = keep[g.root].detach().cpu().bool()
        if len(k) != g.size:
            rows = g.root_idxs()
            if len(k) != len(rows):
                raise PruningError(f"group {g.root}: {len(k)} kept flags for {g.size} units")
            k = k[torch.tensor(rows, dtype=torch.long)].view(-1, g.size).all(0)
        for mem in g.members:
            m = mods[mem.name]
            size = _dim_size(m, mem.dim)
            masks = out.setdefault(mem.name, {})
            mask = masks.get(mem.dim)
            if mask is None:
                mask = torch.ones(size, dtype=torch.bool)
            idx = torch.tensor(mem.idxs, dtype=torch.long)
            root_ch = mem.unit_index(g.size)
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
    """Remove every unit whose root mask is 0, with torch-pruning (base + adapters together).

    An attention group removes whole heads and writes the new head count to the attention module.
    """
    from spa.masks import current_keep

    mods = dict(model.named_modules())
    for g in groups:
        root = mods[g.root]
        keep = current_keep(model, g)
        if bool(keep.all()):
            continue
        if not bool(keep.any()):
            raise PruningError(f"group {g.root} would lose every {'head' if g.attention else 'channel'}")
        drop = sorted(i for j, i in enumerate(g.root_idxs()) if not keep[j % g.size])
        group = dg.get_pruning_group(root, PRUNER.prune_out_channels, drop)
        group.prune()
        if g.attention is not None:
            mods[g.attention].num_heads = int(keep.sum())
