"""``to_graph`` / ``from_graph`` / ``graph_params``: the network <-> graph mapping.

``from_graph(to_graph(m))`` equals ``m`` exactly: every parameter and buffer (BatchNorm running
statistics and ``num_batches_tracked`` included) and the train/eval mode. ``graph_params`` is the
differentiable half of the inverse: it maps (possibly edited) node and edge features to tensors
keyed like ``model.state_dict()``, for ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.errors import GraphError, MetapruneError
from metaprune.graph.builder import single_thread
from metaprune.graph.graph import GRAPH_FORMAT_VERSION, NODE_NEUTRAL, EdgeGroup, Graph, dtype_from_name
from metaprune.graph.trace import trace
from metaprune.models import apply_widths, create_model, get_entry, get_widths
from metaprune.models.registry import ARCH_ATTR, recorded_input_size, set_input_size


def _input_shape(model: nn.Module, arch: dict) -> tuple[int, int, int, int]:
    """One input at the size the model records (trained / pruned at), else its image_size, else its
    architecture's default."""
    get_entry(arch["arch"])  # an architecture that is not known (or not trusted) fails here
    size = recorded_input_size(model)
    return (1, int(arch.get("args", {}).get("in_chans", 3)), int(size), int(size))


@dataclass
class _Structure:
    """Everything about a graph that depends only on the architecture and its widths."""

    node_role: torch.Tensor
    node_layer: torch.Tensor
    node_depth: torch.Tensor
    x_mask: torch.Tensor
    edges: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]   # index, role, layer, dim
    spec: dict
    dtype: torch.dtype                 # of the features
    id_attr: torch.Tensor | None       # the constant features of the identity edges (+1 / -1)


_CACHE: OrderedDict[tuple, _Structure] = OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forget the cached graph structures (see :func:`to_graph`)."""
    _CACHE.clear()


def _structure_key(model: nn.Module, sd: dict[str, torch.Tensor], arch: dict, shape: tuple) -> tuple:
    mods = tuple((n, type(m).__qualname__) for n, m in model.named_modules())
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in sd.items())
    return (json.dumps(arch, sort_keys=True, default=str), json.dumps(get_widths(model), sort_keys=True),
            shape, mods, tensors)


def _fill(st: _Structure, model: nn.Module, sd: dict[str, torch.Tensor]) -> Graph:
    """A graph of ``model`` (state dict ``sd``) on a cached structure: only the features are computed."""
    with single_thread():
        n = st.node_role.shape[0]
        x = torch.tensor(NODE_NEUTRAL, dtype=st.dtype).repeat(n, 1)
        attr = {g: torch.empty(e[0].shape[1], e[3], dtype=st.dtype) for g, e in st.edges.items() if g != "id"}
        layout = []
        for e in st.spec["layout"]:
            t = sd[e["key"]].detach().cpu()
            if e["kind"] == "node":
                s, c, slots = e["start"], e["count"], e["slots"]
                x[s:s + c, slots] = t.reshape(len(slots), c).t().to(st.dtype)
            elif e["kind"] == "edge":
                a = attr[e["group"]][e["offset"]:e["offset"] + e["count"]]
                if e["view"] == "qkv":
                    hd, c = e["shape"][0] // 3, e["shape"][1]
                    a.view(hd, c, 3).copy_(t.reshape(3, hd, c).permute(1, 2, 0))
                else:
                    a.copy_(t.reshape(a.shape))
            else:
                e = {**e, "value": t.item()}
            layout.append(e)
        if st.id_attr is not None:
            attr["id"] = st.id_attr.clone()
    edges = {g: EdgeGroup(index, attr[g], role, layer) for g, (index, role, layer, _) in st.edges.items()}
    spec = {**st.spec, "layout": layout, "training": bool(model.training)}
    return Graph(x, st.x_mask, st.node_role, st.node_layer, st.node_depth, edges, spec)


#: the ``arch`` prefix of a graph made from a module without an architecture spec
MODULE_ARCH_PREFIX = "module:"


def _module_arch(model: nn.Module) -> str:
    t = type(model)
    return f"{MODULE_ARCH_PREFIX}{t.__module__}.{t.__qualname__}"[:200]


def _check_input_shape(input_shape) -> tuple[int, ...]:
    try:
        ok = all(isinstance(s, int) and not isinstance(s, bool) for s in input_shape)
        shape = tuple(int(s) for s in input_shape) if ok else ()
    except TypeError:
        shape = ()
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise GraphError(f"input_shape must be the shape of one input batch, e.g. (1, 3, 224, 224), not {input_shape!r}")
    return shape


def to_graph(model: nn.Module, input_shape: tuple[int, ...] | None = None, cache: bool = True) -> Graph:
    """Convert ``model`` into a :class:`Graph`. The model is not changed.

    ``model`` is built by :func:`metaprune.models.create_model` or loaded with
    :func:`metaprune.io.load_model` (pruned or not; its spec gives the input shape), or it is any
    ``nn.Module`` (a torchvision model, your own) traced at ``input_shape`` (e.g. ``(1, 3, 64, 64)``).
    A graph of a module without an architecture spec is rebuilt with
    ``from_graph(graph, template=a_module_of_the_same_widths)``.

    The structure of a graph (edge index, roles, layers, layout) depends only on the architecture
    and its widths; with ``cache=True`` the structures of the last few architectures are kept, so
    converting another model of the same shape only copies its weights. Graphs of the same shape
    then share their (read-only) ``edge index / role / layer``, ``node_*`` and ``x_mask`` tensors.
    A model without an architecture spec is always traced (its forward is not known from its name).

    Raises:
        GraphError: the model has neither an architecture spec nor an ``input_shape``, a layer type has no
            rule (the message names the module and lists the supported types), a parameter-free
            operation is not in the allow-list of :mod:`metaprune.graph.ops` or would reorder or mix
            channels (the message names it and its module path), two channel tensors are merged in a way
            the graph cannot encode (division, broadcasting), or its channels cannot be followed.

    Features are float32, or float64 for a model with float64 tensors (exact either way).
    """
    if not isinstance(model, nn.Module):
        raise GraphError(f"to_graph needs an nn.Module, not {type(model).__name__}")
    sd = model.state_dict()
    meta = next((k for k, v in sd.items() if v.is_meta), None)
    if meta is not None:
        raise GraphError(f"{type(model).__name__} has tensors on the meta device (e.g. {meta}), which hold no values; "
                         "load its weights first (e.g. model.to_empty(device='cpu') and load_state_dict)")
    arch = getattr(model, ARCH_ATTR, None)
    if not isinstance(arch, dict) or not isinstance(arch.get("arch"), str):
        arch = None
    if input_shape is not None:
        shape = _check_input_shape(input_shape)
    elif arch is None:
        raise GraphError(f"{type(model).__name__} has no architecture spec (model.{ARCH_ATTR}), so its input shape "
                         "is unknown: pass input_shape, e.g. to_graph(model, input_shape=(1, 3, 224, 224)) "
                         "(or build it with metaprune.models.create_model / load it with metaprune.io.load_model)")
    else:
        try:
            shape = _input_shape(model, arch)
        except MetapruneError as e:
            raise GraphError(f"the input shape of architecture {arch['arch']!r} is not known ({e}); pass input_shape, "
                             "e.g. to_graph(model, input_shape=(1, 3, 224, 224))") from None
    if arch is None:
        # no cache: without a spec, the forward code (closures, flags) is not determined by the module
        # names and tensor shapes the cache key holds
        arch, cache = {"arch": _module_arch(model), "args": {}}, False
    key = _structure_key(model, sd, arch, shape) if cache else None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _fill(_CACHE[key], model, sd)
    builder, _ = trace(model, shape)
    covered = {e["key"] for e in builder.layout}
    if len(covered) != len(builder.layout):
        dup = sorted({e["key"] for e in builder.layout if sum(f["key"] == e["key"] for f in builder.layout) > 1})
        raise GraphError(f"the parameters {dup[:5]} are used by more than one layer call (weight sharing), "
                         "which the graph cannot represent")
    missing = [k for k in sd if k not in covered]
    if missing:
        raise GraphError(f"the graph does not cover the tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                         "they are never used in forward, their result does not reach the output, or they are used by an "
                         "operation without a graph rule")
    buffers = {k for k, _ in model.named_buffers()}
    for e in builder.layout:
        e["buffer"] = e["key"] in buffers
    spec = {"format_version": GRAPH_FORMAT_VERSION, "arch": arch["arch"], "arch_args": dict(arch.get("args", {})),
            "widths": get_widths(model), "training": bool(model.training), "input_shape": list(shape),
            "keys": list(sd), "layout": builder.layout, "layers": builder.layers}
    g = builder.build(spec)
    if key is not None:
        _CACHE[key] = _Structure(g.node_role, g.node_layer, g.node_depth, g.x_mask,
                                 {k: (e.index, e.role, e.layer, e.feature_dim) for k, e in g.edges.items()}, spec,
                                 g.x.dtype, g.edges["id"].attr.clone() if "id" in g.edges else None)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return g


def graph_params(graph: Graph, x: torch.Tensor | None = None,
                 edge_attr: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Map node features ``x`` [N, F] and edge features ``edge_attr`` (group -> [E, D]) to the
    model's parameters and buffers, keyed like ``model.state_dict()`` and in its order.

    Differentiable: parameters are views / reshapes of ``x`` and ``edge_attr`` (cast to each
    tensor's dtype), so gradients of a loss computed with
    ``torch.func.functional_call(model, graph_params(g, x, ea), inputs)`` flow back to ``x`` and
    ``edge_attr``. Buffers (BatchNorm running statistics) take their values from ``x`` too, but as
    detached copies: ``batch_norm`` cannot differentiate through them, and in train mode it updates
    them in place, which must not write into the graph. Defaults are the graph's own features.
    Slots that hold no parameter (see ``graph.x_mask``) and identity edges are not read.
    """
    x = graph.x if x is None else x
    ea = graph.edge_attr() if edge_attr is None else {**graph.edge_attr(), **edge_attr}
    if tuple(x.shape) != tuple(graph.x.shape):
        raise GraphError(f"node features have shape {tuple(x.shape)}, the graph needs {tuple(graph.x.shape)}")
    for k, g in graph.edges.items():
        if tuple(ea[k].shape) != tuple(g.attr.shape):
            raise GraphError(f"edge features of group {k!r} have shape {tuple(ea[k].shape)}, "
                             f"the graph needs {tuple(g.attr.shape)}")
    out: dict[str, torch.Tensor] = {}
    for e in graph.spec["layout"]:
        kind, shape, dt = e["kind"], e["shape"], dtype_from_name(e["dtype"])
        if kind == "node":
            s, n, slots = e["start"], e["count"], e["slots"]
            v = x[s:s + n, slots[0]] if len(slots) == 1 else x[s:s + n, slots].t()
            t = v.reshape(shape)
        elif kind == "edge":
            a = ea[e["group"]][e["offset"]:e["offset"] + e["count"]]
            if e["view"] == "qkv":
                hd, c = shape[0] // 3, shape[1]
                t = a.reshape(hd, c, 3).permute(2, 0, 1).reshape(shape)
            else:
                t = a.reshape(shape)
        else:
            t = torch.tensor(e["value"], dtype=dt, device=x.device).reshape(shape)
        t = t if t.dtype == dt else t.to(dt)
        out[e["key"]] = t.detach().clone() if e.get("buffer") and kind != "const" else t
    keys = graph.spec.get("keys")
    return {k: out[k] for k in keys} if keys else out


def build_module(spec: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build the architecture of a graph spec at its widths and load ``state_dict`` into it (the
    tensors are taken over, not copied). Construction happens on the ``meta`` device, so no time
    is spent on random initialisation."""
    try:
        with torch.device("meta"):
            model = create_model(spec["arch"], **spec["arch_args"])
            apply_widths(model, spec.get("widths", {}), state_dict)
    except GraphError:
        raise
    except MetapruneError as e:  # unknown architecture or arguments, widths that do not fit it
        raise GraphError(f"the graph cannot be rebuilt: {e}") from None
    except (TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as e:
        raise GraphError(f"cannot build architecture {spec['arch']!r} with the graph's arguments "
                         f"{spec['arch_args']} and widths: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise GraphError(f"the graph's tensors do not fit architecture {spec['arch']!r}: "
                         f"{' '.join(str(e).splitlines()[:2])}") from None
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise GraphError(f"the graph spec leaves {left[:3]} unset; the graph is incomplete")
    shape = spec.get("input_shape")
    if isinstance(shape, list) and len(shape) == 4 and shape[-1] == shape[-2]:  # the size it was converted at
        try:
            set_input_size(model, shape[-1])
        except MetapruneError as e:
            raise GraphError(f"the graph's input_shape {shape} is not valid ({e})") from None
    return model.train(bool(spec.get("training", False)))


def _onto_template(spec: dict, sd: dict[str, torch.Tensor], template: nn.Module) -> nn.Module:
    """A deep copy of ``template`` holding the graph's tensors (which must match its own in key, shape and dtype)."""
    if not isinstance(template, nn.Module):
        raise GraphError(f"template must be an nn.Module, not {type(template).__name__}")
    own = template.state_dict()
    missing, extra = [k for k in own if k not in sd], [k for k in sd if k not in own]
    if missing or extra:
        raise GraphError(f"the template {type(template).__name__} does not fit the graph: tensors "
                         f"{(missing or extra)[:3]} are {'missing from the graph' if missing else 'not in the template'}; "
                         "pass a template of the same architecture and widths")
    for k, v in own.items():
        if tuple(v.shape) != tuple(sd[k].shape) or v.dtype != sd[k].dtype:
            raise GraphError(f"the template's tensor {k} is {tuple(v.shape)} {v.dtype}, the graph's "
                             f"{tuple(sd[k].shape)} {sd[k].dtype}; pass a template of the same widths and dtype")
    try:
        model = copy.deepcopy(template)
    except Exception as e:  # noqa: BLE001 - a module that cannot be copied
        raise GraphError(f"cannot copy the template {type(template).__name__}: {e}") from None
    with torch.no_grad():
        for k, t in model.state_dict(keep_vars=True).items():
            if t.is_meta:
                continue
            t.copy_(sd[k])
    if any(t.is_meta for t in model.state_dict().values()):
        model.load_state_dict(sd, strict=True, assign=True)
    return model.train(bool(spec.get("training", False)))


def from_graph(graph: Graph, template: nn.Module | None = None) -> nn.Module:
    """Rebuild the network of ``graph`` (the exact inverse of :func:`to_graph`). The module owns
    fresh copies of its tensors, so training it does not change the graph.

    A graph of a registered architecture is rebuilt from its spec. With ``template`` (needed for a
    graph made from a module without an architecture spec, e.g. a torchvision model traced with
    ``input_shape``) the result is a deep copy of ``template`` with the graph's tensors written
    into it; the template must have the graph's tensor names, shapes and dtypes and is not changed.
    """
    params = graph_params(graph)
    with single_thread():
        sd = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in params.items()}
    if template is not None:
        return _onto_template(graph.spec, sd, template)
    arch = graph.spec.get("arch", "")
    if arch.startswith(MODULE_ARCH_PREFIX):
        raise GraphError(f"the graph was made from a {arch[len(MODULE_ARCH_PREFIX):]} without an architecture spec, "
                         "so it cannot be rebuilt on its own: pass from_graph(graph, template=model), a module of the "
                         "same architecture and widths (its weights are overwritten in a copy)")
    return build_module(graph.spec, sd)
