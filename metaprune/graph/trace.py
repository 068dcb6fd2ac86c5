"""Trace a model with torch.fx and follow its channels through the graph.

Layers that have a rule (:mod:`metaprune.graph.rules`) are fx leaves; everything else is traced
through. The traced graph is run once on ``meta`` tensors (no data, no compute) so that every
value has a shape, and each value is given a :class:`~metaprune.graph.rules.Flow`: which graph
nodes its channels are and in which dimension they sit. Parameter-free operations keep the
flow (activations, pooling, dropout) or move its dimension (flatten, reshape, permute,
transpose, indexing); residual adds and channel concats create new nodes joined one-to-one to
their inputs (group ``id``); a class token concatenated to the tokens and a position embedding
added to them are parameters of the residual stream (slot ``token`` / group ``pos``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph.builder import GraphBuilder, NodeSet
from metaprune.graph.graph import SLOT
from metaprune.graph.rules import Flow, find_rule, supported_types

_MERGE_OPS = {"add", "iadd", "sub", "isub", "mul", "imul", "add_", "sub_", "mul_", "div", "truediv"}
_RESHAPE_OPS = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous"}
_REDUCE_OPS = {"mean", "sum", "amax", "amin"}


@dataclass
class ParamRef:
    """A value that is (an expansion of) one of the model's parameters, by state-dict key."""

    key: str


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return find_rule(m) is not None or super().is_leaf_module(m, qualname)


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target)).strip("_")


def _flat_nodes(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, out.append)
    return out


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[GraphBuilder, fx.GraphModule]:
    """Trace ``model`` and declare its graph on a fresh builder. Raises :class:`GraphError` when a
    layer has no rule or the channels of a layer's input cannot be followed."""
    try:
        tracer = _LeafTracer()
        fxg = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, fxg)
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means the model cannot be traced
        raise GraphError(f"torch.fx cannot trace {type(model).__name__}: {str(e).splitlines()[0]}; the model's "
                         "forward must not branch on tensor values") from None
    builder = GraphBuilder()
    _Interp(gm, builder).run(torch.empty(input_shape, device="meta"))
    return builder, gm


class _Interp(fx.Interpreter):
    """Runs the traced graph on meta tensors and assigns a flow to every value."""

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder):
        super().__init__(gm, garbage_collect_values=False)
        self.b = builder
        self.flows: dict[fx.Node, Any] = {}
        self.mods = dict(gm.named_modules())
        self.seen_inputs = 0

    # ---------------------------------------------------------------- execution on meta
    def call_module(self, target, args, kwargs):
        mod = self.mods[target]
        state = {k: v.to("meta") for k, v in [*mod.named_parameters(), *mod.named_buffers()] if v is not None}
        if not state:
            return super().call_module(target, args, kwargs)
        return torch.func.functional_call(mod, state, args, kwargs)

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.to("meta") if isinstance(v, torch.Tensor) else v

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.flows[n] = self._flow(n, out)
        return out

    # ---------------------------------------------------------------- channel flows
    def _flow(self, n: fx.Node, out: Any):
        if n.op == "placeholder":
            if self.seen_inputs:
                raise GraphError(f"the model takes more than one input ({n.target!r}); only single-input models convert")
            self.seen_inputs = 1
            ns = self.b.new_nodes(out.shape[1], "input", 0, 0)
            return Flow(ns, 1)
        if n.op == "get_attr":
            return ParamRef(str(n.target)) if isinstance(out, torch.Tensor) else None
        if n.op == "output":
            res = self.flows.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            if not isinstance(res, Flow):
                raise GraphError("cannot tell which channels the model's output holds; the output must be "
                                 "one tensor whose channels come from a layer")
            if res.ns.layer > 0:
                self.b.set_role(res.ns, "output")
            self.b.output_flow = res
            return None
        if n.op == "call_module":
            mod = self.mods[str(n.target)]
            rule = find_rule(mod)
            if rule is not None:
                x = self.flows.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
                if not isinstance(x, Flow):
                    raise GraphError(f"{n.target} ({type(mod).__name__}): cannot tell which channels feed it")
                return rule(self.b, str(n.target), mod, x, self.env[n.args[0]])
            if any(True for _ in mod.parameters()) or any(b is not None for b in mod.buffers()):
                raise GraphError(f"{n.target} ({type(mod).__name__}) has parameters but no graph rule; "
                                 f"supported layer types: {supported_types()}. Add a rule in metaprune/graph/rules.py")
        return self._generic(n, out)

    def _generic(self, n: fx.Node, out: Any):
        name = _op_name(n)
        arg_nodes = _flat_nodes((n.args, n.kwargs))
        flows = [(a, self.flows.get(a)) for a in arg_nodes]
        if name == "getitem" and isinstance(self.flows.get(n.args[0]), tuple):
            return self.flows[n.args[0]][n.args[1]]
        if not isinstance(out, torch.Tensor):
            return None
        chan = [(a, f) for a, f in flows if isinstance(f, Flow)]
        params = [(a, f) for a, f in flows if isinstance(f, ParamRef)]
        if not chan:
            return params[0][1] if params and len(params) == 1 and name in ("expand", "contiguous", "to") else None
        if name == "cat":
            return self._cat(n, out, chan, params)
        if params:
            if name in ("add", "iadd") and len(chan) == 1 and len(params) == 1:
                return self._add_embedding(n, out, chan[0][1], params[0][1])
            raise GraphError(f"the parameter {params[0][1].key!r} is used by the operation {name!r} "
                             f"({n.name}), which the graph has no rule for; supported layer types: {supported_types()}")
        if len(chan) > 1:
            if name not in _MERGE_OPS:
                raise GraphError(f"the operation {name!r} ({n.name}) combines several tensors' channels; "
                                 f"the graph knows only elementwise {sorted(_MERGE_OPS)} and cat")
            return self._merge(n, out, [f for _, f in chan])
        a, f = chan[0]
        cdim = self._map_dim(n, name, self.env[a], out, f)
        return None if cdim is None else Flow(f.ns, cdim)

    def _map_dim(self, n: fx.Node, name: str, inp: torch.Tensor, out: torch.Tensor, f: Flow) -> int | None:
        c, cd = f.ns.size, f.cdim
        args = n.args[1:]
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = [d % inp.ndim for d in dims]
            return dims.index(cd)
        if name in ("transpose", "swapaxes"):
            a, b = (d % inp.ndim for d in args[:2])
            return b if cd == a else a if cd == b else cd
        if name in _RESHAPE_OPS:
            inner = math.prod(inp.shape[cd + 1:])
            for d in range(out.ndim):
                if out.shape[d] == c and math.prod(out.shape[d + 1:]) == inner:
                    return d
            return None
        if name == "getitem":
            return self._index_dim(args[0], inp, cd)
        if name in _REDUCE_OPS:
            dims = args[0] if args else n.kwargs.get("dim")
            keep = n.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
            if dims is None:
                return None
            dims = [d % inp.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
            if cd in dims:
                return None
            return cd if keep else cd - sum(d < cd for d in dims)
        if out.ndim == inp.ndim and out.shape[cd] == c:
            return cd
        return None

    @staticmethod
    def _index_dim(idx: Any, inp: torch.Tensor, cd: int) -> int | None:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            fill = inp.ndim - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        d_in, d_out = 0, 0
        for i in idx:
            if i is None:
                d_out += 1
                continue
            if d_in == cd:
                full = isinstance(i, slice) and i == slice(None)
                return d_out if full else None
            if isinstance(i, slice):
                d_out += 1
            elif not isinstance(i, int):
                return None
            d_in += 1
        return d_out + (cd - d_in)

    def _merge(self, n: fx.Node, out: torch.Tensor, fl: list[Flow]) -> Flow:
        size = fl[0].ns.size
        if any(f.ns.size != size for f in fl):
            raise GraphError(f"{n.name}: adds tensors with different channel counts {[f.ns.size for f in fl]}")
        cdim = fl[0].cdim + (out.ndim - self.env[n.args[0]].ndim if isinstance(n.args[0], fx.Node) else 0)
        layer = self.b.new_layer(n.name, "residual")
        ns = self.b.new_nodes(size, "residual", max(f.ns.depth for f in fl) + 1, layer)
        for f in fl:
            self.b.identity_edges(f.ns, ns, layer)
        return Flow(ns, cdim)

    def _cat(self, n: fx.Node, out: torch.Tensor, chan: list, params: list) -> Flow:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim %= out.ndim
        cdims = {f.cdim for _, f in chan}
        if len(cdims) != 1:
            raise GraphError(f"{n.name}: concatenates tensors whose channels sit in different dims")
        cd = cdims.pop()
        if dim == cd:
            if params:
                raise GraphError(f"{n.name}: concatenates the parameter {params[0][1].key!r} along channels; unsupported")
            layer = self.b.new_layer(n.name, "concat")
            ns = self.b.new_nodes(sum(f.ns.size for _, f in chan), "concat",
                                  max(f.ns.depth for _, f in chan) + 1, layer)
            off = 0
            for _, f in chan:
                self.b.identity_edges(f.ns, NodeSet(ns.start + off, f.ns.size, ns.depth, layer), layer)
                off += f.ns.size
            return Flow(ns, cd)
        sets = {id(f.ns) for _, f in chan}
        if len(sets) != 1:
            raise GraphError(f"{n.name}: concatenates tensors from different channel spaces along dim {dim}")
        ns = chan[0][1].ns
        for a, p in params:
            if tensors.count(a) != 1:
                raise GraphError(f"{n.name}: unexpected use of {p.key!r}")
            self._token_param(n, p.key, ns, cd, out.ndim)
        return Flow(ns, cd)

    def _param(self, key: str) -> torch.Tensor:
        return self.module.get_parameter(key) if key in dict(self.module.named_parameters()) \
            else self.module.get_buffer(key)

    def _token_param(self, n: fx.Node, key: str, ns: NodeSet, cd: int, ndim: int) -> None:
        p = self._param(key)
        if p.numel() != ns.size or p.ndim != ndim or p.shape[cd] != ns.size:
            raise GraphError(f"{n.name}: the token parameter {key!r} of shape {tuple(p.shape)} is not one value per "
                             f"channel of {ns.size}; only single class tokens are supported")
        self.b.node_param(key, p, ns, [SLOT["token"]])

    def _add_embedding(self, n: fx.Node, out: torch.Tensor, f: Flow, pr: ParamRef) -> Flow:
        """``x + P`` with P one vector per channel (slot ``bias`` of new nodes) or per (position, channel)
        (group ``pos`` from one node per position)."""
        p = self._param(pr.key)
        layer = self.b.new_layer(n.name, "add_parameter")
        ns = self.b.new_nodes(f.ns.size, "residual", f.ns.depth + 1, layer)
        self.b.identity_edges(f.ns, ns, layer)
        if p.numel() == f.ns.size:
            self.b.node_param(pr.key, p, ns, [SLOT["bias"]])
        elif p.ndim == out.ndim and f.cdim == out.ndim - 1 and p.shape[-1] == f.ns.size:
            t = p.numel() // f.ns.size
            pos = self.b.new_nodes(t, "position", 0, layer)
            self.b.dense_edges("pos", pos, ns, p.detach().reshape(-1, 1), "position", layer, outer="src",
                               key=pr.key, shape=list(p.shape), dtype=p.dtype)
        else:
            raise GraphError(f"{n.name}: adds the parameter {pr.key!r} of shape {tuple(p.shape)}, which is neither one "
                             "value per channel nor one per (position, channel) with channels last")
        return Flow(ns, f.cdim)


__all__ = ["ParamRef", "trace"]
