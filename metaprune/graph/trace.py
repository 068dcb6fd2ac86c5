"""Trace a model with torch.fx and follow its channels through the graph.

Layers that have a rule (:mod:`metaprune.graph.rules`) are fx leaves; everything else is traced
through. The traced graph is run once on ``meta`` tensors (no data, no compute) so that every
value has a shape, and each value is given a :class:`~metaprune.graph.rules.Flow`: which graph
nodes its channels are and in which dimension they sit. Only values that reach the model's
output are followed (an unused value creates no node). Parameter-free operations must be in the
allow-list of :mod:`metaprune.graph.ops`: they keep the flow (activations, pooling, dropout,
scalar arithmetic) or move its dimension (flatten, reshape, permute, transpose, indexing); any
other operation on a channel tensor is refused, because it may reorder or mix channels
(``flip(1)``, ``roll``, ``nn.ChannelShuffle``). ``a + b``, ``a - b`` and ``a * b`` of two channel
tensors create new nodes (role ``residual`` / ``difference`` / ``product``) joined one-to-one to
their inputs (group ``id``, feature ``+1``, ``-1`` for the subtracted operand); a quotient of
channel tensors is refused. Channel concats create ``concat`` nodes; a class token concatenated to
the tokens and a position embedding added to them are parameters of the residual stream (slot
``token`` / group ``pos``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph.builder import GraphBuilder, NodeSet
from metaprune.graph.graph import SLOT
from metaprune.graph.ops import INPLACE, MERGE_KIND, METHOD_KINDS, function_kind, module_kind
from metaprune.graph.rules import Flow, find_rule, supported_types

_MERGE_ROLE = {"add": "residual", "sub": "difference", "mul": "product"}
_OPS_HINT = ("the graph follows only the parameter-free operations listed in metaprune/graph/ops.py (activations, "
             "dropout, pooling, reshapes, permutes, indexing, +, -, *, cat); remove it, or register it with "
             "metaprune.graph.register_channel_op if it neither reorders nor mixes channels")


@dataclass
class ParamRef:
    """A value that is (an expansion of) one of the model's parameters, by state-dict key."""

    key: str
    #: the value's shape after a ``view`` / ``reshape`` of the parameter (None: the parameter's own shape)
    shape: tuple[int, ...] | None = None


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (find_rule(m) is not None or module_kind(m) is not None
                or super().is_leaf_module(m, qualname))


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", str(n.target)).strip("_")


def _flat_nodes(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, out.append)
    return out


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the output depends on."""
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


def _in_module(n: fx.Node) -> str:
    """`` in module PATH (Type)`` for a traced operation inside a submodule (empty at the top level)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    return f" in module {path} ({getattr(cls, '__name__', cls)})"


def _dims(v: Any, ndim: int) -> list[int]:
    v = v if isinstance(v, (tuple, list)) else [v]
    return [int(d) % ndim for d in v]


def _arg(n: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``pos`` (counting the input tensor as 0) or keyword ``name`` of a call."""
    if len(n.args) > pos:
        return n.args[pos]
    return n.kwargs.get(name, default)


def _default_args(model: nn.Module) -> dict[str, Any]:
    """The optional arguments of ``model.forward`` after the input (timm's ``forward(x, attn_mask=None)``),
    fixed at their defaults: the model converts as it is called with one input. An argument without a
    default stays an input (and is refused as a second one)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[GraphBuilder, fx.GraphModule]:
    """Trace ``model`` and declare its graph on a fresh builder. Raises :class:`GraphError` when a
    layer has no rule, an operation is not known to keep channels in place, or the channels of a
    layer's input cannot be followed."""
    try:
        tracer = _LeafTracer()
        fxg = tracer.trace(model, concrete_args=_default_args(model) or None)
        gm = fx.GraphModule(tracer.root, fxg)
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means the model cannot be traced
        stack = list(getattr(tracer, "module_stack", {}).values())  # fx leaves the failing call's modules on it
        inside = ""
        if stack and stack[-1][0]:
            path, cls = stack[-1]
            inside = f" in module {path} ({getattr(cls, '__name__', cls)})"
        raise GraphError(f"torch.fx cannot trace {type(model).__name__}{inside}: {str(e).splitlines()[0]}; the "
                         "model's forward must not branch on tensor values or on the input's shape") from None
    builder = GraphBuilder()
    # a batch of 2 (not 1): a size-1 channel dimension (a layer pruned to width 1) must not be
    # mistaken for the batch dimension when a reshape is followed
    shape = (max(2, int(input_shape[0])), *input_shape[1:])
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    interp = _Interp(gm, builder)
    try:
        interp.run(torch.empty(shape, device="meta", dtype=dtype))
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001 - the forward itself fails at these shapes
        where = interp.current.format_node() if interp.current is not None else "?"
        raise GraphError(f"running {type(model).__name__} on meta tensors of shape {list(input_shape)} failed at "
                         f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return builder, gm


class _Interp(fx.Interpreter):
    """Runs the traced graph on meta tensors and assigns a flow to every value."""

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder):
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False  # our errors are one line; fx would append the node and a traceback
        self.b = builder
        self.flows: dict[fx.Node, Any] = {}
        self.mods = dict(gm.named_modules())
        self.seen_inputs = 0
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.live = _live_nodes(gm.graph)
        self.param_keys = {k for k, _ in gm.named_parameters()}  # get_attr targets: parameters, else buffers
        self.current: fx.Node | None = None

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
        self.current = n
        if n not in self.live:  # does not reach the output: no nodes, not even run
            self._check_dead(n)
            self.flows[n] = None
            return None
        out = super().run_node(n)
        self.flows[n] = self._flow(n, out)
        return out

    def _check_dead(self, n: fx.Node) -> None:
        """An unused in-place change of a channel tensor that is read later would be lost."""
        if n.op not in ("call_function", "call_method"):
            return
        name = _op_name(n)
        mutates = name in INPLACE or (n.op == "call_method" and name.endswith("_")
                                      and METHOD_KINDS.get(name) != "elementwise")
        if mutates and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in self.live \
                and isinstance(self.flows.get(n.args[0]), Flow):
            raise GraphError(f"the in-place operation {name!r} ({n.name}) changes a channel tensor that is read "
                             "later; the graph cannot follow in-place changes: write `x = x + y` instead")

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
            if not isinstance(res, Flow) or not res.plain:
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
                if isinstance(x, ParamRef):
                    raise GraphError(f"{n.target} ({type(mod).__name__}) is applied to the parameter or buffer "
                                     f"{x.key!r}, not to channels of the model's input (e.g. a relative position "
                                     "MLP); the graph cannot encode it")
                if not isinstance(x, Flow):
                    raise GraphError(f"{n.target} ({type(mod).__name__}): cannot tell which channels feed it")
                others = [a for a in _flat_nodes((n.args[1:], n.kwargs))
                          if a is not n.args[0] and _has_tensor(self.env.get(a))]
                if others:
                    raise GraphError(f"{n.target} ({type(mod).__name__}) reads the tensor {others[0].name!r} besides its "
                                     "input (e.g. cross-attention or a mask); the graph encodes only layers of one "
                                     "input (self-attention: query, key and value the same tensor)")
                return rule(self.b, str(n.target), mod, x, self.env[n.args[0]])
            if any(True for _ in mod.parameters()) or any(b is not None for b in mod.buffers()):
                raise GraphError(f"{n.target} ({type(mod).__name__}) has parameters but no graph rule; "
                                 f"supported layer types: {supported_types()}. Add a rule in metaprune/graph/rules.py")
            return self._op(n, module_kind(mod), f"the module {n.target} ({type(mod).__name__})", out, mod)
        name = _op_name(n)
        kind = function_kind(n.target) if n.op == "call_function" else METHOD_KINDS.get(str(n.target))
        return self._op(n, kind, f"the operation {name!r} ({n.name}{_in_module(n)})", out)

    def _op(self, n: fx.Node, kind: str | None, where: str, out: Any, mod: nn.Module | None = None):
        """The flow of a parameter-free operation of ``kind`` (None: not in the allow-list)."""
        arg_nodes = _flat_nodes((n.args, n.kwargs))
        if kind == "getitem" and isinstance(self.flows.get(n.args[0]), tuple):
            return self.flows[n.args[0]][n.args[1]]
        chan = [a for a in arg_nodes if isinstance(self.flows.get(a), Flow)]
        params = [a for a in arg_nodes if isinstance(self.flows.get(a), ParamRef)]
        if not chan:  # shapes, parameters on their own, values without channels
            name = _op_name(n) if n.op == "call_method" else None  # x.expand(..) of a parameter
            if len(params) == 1 and isinstance(out, torch.Tensor) and name in ("expand", "contiguous", "to"):
                return self.flows[params[0]]
            # g.reshape(1, -1, 1, 1) / g.view(shape) of a parameter (timm's layer scales): the same values in
            # the same order, a new shape, which the layer scale / embedding checks then read
            if len(params) == 1 and isinstance(out, torch.Tensor) and name in ("view", "reshape") \
                    and n.args[0] is params[0]:
                pr = self.flows[params[0]]
                if out.numel() == self._param(pr.key).numel():
                    return ParamRef(pr.key, tuple(out.shape))
            return None
        if kind is None:
            if not _has_tensor(out):  # x.shape, x.dim(), x.size(1)
                return None
            if params:
                raise GraphError(f"the parameter {self.flows[params[0]].key!r} is used by {where}, which the graph "
                                 f"has no rule for; supported layer types: {supported_types()}")
            raise GraphError(f"{where} is not known to keep channel c at channel c; {_OPS_HINT}")
        if kind == "constant":
            return None
        if any(self.flows[a].grid is not None for a in chan) \
                and kind not in ("elementwise", "transpose", "permute", "reshape"):
            raise GraphError(f"{where} acts on channels split over several dims; the graph follows them only "
                             "through transposes and a reshape that joins them again (a channel shuffle)")
        if any(self.flows[a].inner != 1 for a in chan) and kind != "elementwise":
            raise GraphError(f"{where} acts on a flattened feature map (channels x positions in one dim); the graph "
                             "follows it only into a Linear layer (and through activations / dropout)")
        if kind == "split":
            return self._split(n, where, out)
        if kind == "cat":
            return self._cat(n, where, out)
        if kind == "arith":
            return self._arith(n, where, out, arg_nodes)
        first = n.args[0] if n.args else None
        tensors = [a for a in arg_nodes if isinstance(self.env.get(a), torch.Tensor)]
        if not isinstance(first, fx.Node) or any(a is not first for a in tensors):
            extra = next(a for a in tensors if a is not first)
            what = (f"the parameter {self.flows[extra].key!r}" if isinstance(self.flows.get(extra), ParamRef)
                    else f"the tensor {extra.name!r}")
            raise GraphError(f"{where} reads {what} besides its input; the graph cannot tell how it acts on the "
                             "channels")
        f = self.flows.get(first)
        if not isinstance(f, Flow):
            return None
        if not isinstance(out, torch.Tensor):
            raise GraphError(f"{where} returns {type(out).__name__}, not one tensor; {_OPS_HINT}")
        if kind == "elementwise" and not f.plain:
            if tuple(out.shape) != tuple(self.env[first].shape):
                raise GraphError(f"{where} changes the shape {tuple(self.env[first].shape)} to {tuple(out.shape)}")
            return f
        if f.grid is not None:
            return self._grid_op(n, kind, where, self.env[first], out, f)
        if kind == "reshape":
            grid = self._split_grid(self.env[first], out, f)
            if grid is not None:
                return Flow(f.ns, -1, grid=grid)
        if kind in ("flatten", "reshape"):
            inner = self._merged_inner(self.env[first], out, f)
            if inner is not None:
                return inner
        if kind == "getitem":
            part = self._channel_slice(n, self.env[first], f)
            if part is not None:
                return part
        cd = self._map_dim(n, kind, where, self.env[first], out, f, mod)
        return None if cd is None else Flow(f.ns, cd)

    @staticmethod
    def _split_grid(inp: torch.Tensor, out: torch.Tensor, f: Flow) -> tuple | None:
        """A reshape that splits the channel dim into several dims ``out[i:j]`` (all > 1), the dims around it
        unchanged: the grid ``((i, size, 0), (i+1, size, 1), ...)``; None otherwise."""
        cd, c = f.cdim, f.ns.size
        outer, inner = math.prod(inp.shape[:cd]), math.prod(inp.shape[cd + 1:])
        for i in range(out.ndim):
            for j in range(i + 2, out.ndim + 1):
                if math.prod(out.shape[:i]) == outer and math.prod(out.shape[i:j]) == c \
                        and math.prod(out.shape[j:]) == inner and all(s > 1 for s in out.shape[i:j]):
                    return tuple((i + k, int(out.shape[i + k]), k) for k in range(j - i))
        return None

    def _grid_op(self, n: fx.Node, kind: str, where: str, inp: torch.Tensor, out: torch.Tensor, f: Flow) -> Flow:
        """Channels split over several dims: transposes move the dims; a reshape joining them into one dim
        again gives the channel permutation (new nodes, role ``concat``, one identity edge from each source
        channel), e.g. ShuffleNet's ``view(b, g, c/g, h, w).transpose(1, 2).view(b, c, h, w)``."""
        nd = inp.ndim
        if kind == "transpose":
            a, b = _dims([_arg(n, 1, "dim0"), _arg(n, 2, "dim1")], nd)
            return Flow(f.ns, -1, grid=tuple((b if d == a else a if d == b else d, s, ax) for d, s, ax in f.grid))
        if kind == "permute":
            dims = _dims(n.args[1:] if len(n.args) > 2 else _arg(n, 1, "dims"), nd)
            return Flow(f.ns, -1, grid=tuple((dims.index(d), s, ax) for d, s, ax in f.grid))
        entries = sorted(f.grid)
        p, k, c = entries[0][0], len(entries), f.ns.size
        outer, inner = math.prod(inp.shape[:p]), math.prod(inp.shape[p + k:])
        ds = [d for d in range(out.ndim) if out.shape[d] == c and math.prod(out.shape[:d]) == outer
              and math.prod(out.shape[d + 1:]) == inner]
        if kind != "reshape" or [d for d, _, _ in entries] != list(range(p, p + k)) or not ds:
            raise GraphError(f"{where} acts on channels split over several dims in a way the graph cannot follow "
                             "(only transposes and a reshape that joins them again, as a channel shuffle does)")
        sizes = [s for _, s, _ in sorted(f.grid, key=lambda e: e[2])]
        perm = torch.arange(c).reshape(sizes).permute([ax for _, _, ax in entries]).reshape(-1)
        if torch.equal(perm, torch.arange(c)):
            return Flow(f.ns, ds[0])
        layer = self.b.new_layer(n.name, "channel_permutation")
        ns = self.b.new_nodes(c, "concat", f.ns.depth + 1, layer)
        self.b.perm_edges(f.ns, ns, perm, layer)
        return Flow(ns, ds[0])

    @staticmethod
    def _merged_inner(inp: torch.Tensor, out: torch.Tensor, f: Flow) -> Flow | None:
        """``(N, C, H, W) -> (N, C*H*W)``: the channels merged with all the dims after them (channel-major)
        into the last dim of the output: a flow with ``inner = H*W`` (None if that is not the case)."""
        cd, c = f.cdim, f.ns.size
        inner = math.prod(inp.shape[cd + 1:])
        if inner <= 1 or out.ndim == 0 or out.shape[-1] != c * inner \
                or math.prod(out.shape[:-1]) != math.prod(inp.shape[:cd]):
            return None
        return Flow(f.ns, out.ndim - 1, inner)

    def _split(self, n: fx.Node, where: str, out: Any) -> Any:
        """``x.chunk(k, dim)`` / ``x.split(size, dim)`` / ``torch.split``: along the channels, each part is new
        nodes (role ``concat``) joined one-to-one to its range of the input's channels; along another dim
        every part keeps the input's channels."""
        f = self.flows[n.args[0]]
        inp = self.env[n.args[0]]
        if not isinstance(out, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in out):
            raise GraphError(f"{where} does not return tensors")
        dim = _arg(n, 2, "dim", 0) % inp.ndim
        if dim != f.cdim:
            return tuple(Flow(f.ns, f.cdim) for _ in out)
        flows, off = [], 0
        for t in out:
            size = int(t.shape[dim])
            layer = self.b.new_layer(f"{n.name}.{len(flows)}", "split")
            ns = self.b.new_nodes(size, "concat", f.ns.depth + 1, layer)
            self.b.identity_edges(f.ns, ns, layer, src_start=off)
            flows.append(Flow(ns, f.cdim))
            off += size
        return tuple(flows)

    def _map_dim(self, n: fx.Node, kind: str, where: str, inp: torch.Tensor, out: torch.Tensor, f: Flow,
                 mod: nn.Module | None) -> int | None:
        """Where the channel dim ``f.cdim`` of ``inp`` is in ``out`` (None: the channels are no longer
        one dimension of it); raises for an operation that would reorder or mix the channels."""
        c, cd, nd = f.ns.size, f.cdim, inp.ndim
        if kind == "elementwise":
            if tuple(out.shape) != tuple(inp.shape):
                raise GraphError(f"{where} changes the shape {tuple(inp.shape)} to {tuple(out.shape)}")
            return cd
        if kind in ("pool1d", "pool2d"):
            k = 1 if kind == "pool1d" else 2
            if cd >= nd - k or out.ndim != nd:
                raise GraphError(f"{where} pools over the channel dimension {cd} of a {nd}-d tensor; "
                                 "the graph cannot map pooled channels")
            return cd
        if kind == "spatial":
            if cd >= 2 or out.ndim != nd or out.shape[cd] != c:
                raise GraphError(f"{where} resizes dims 2.. but the channels are in dim {cd}")
            return cd
        if kind == "pad":
            pad = _arg(n, 1, "pad")
            if not isinstance(pad, (tuple, list)) or cd >= nd - len(pad) // 2 or out.shape[cd] != c:
                raise GraphError(f"{where} pads the channel dimension {cd}")
            return cd
        if kind == "softmax":
            dim = mod.dim if mod is not None else _arg(n, 1, "dim")
            if dim is None or int(dim) % nd == cd:
                raise GraphError(f"{where} normalises over the channel dimension (dim={dim}); it mixes channels")
            return cd
        if kind in ("flip", "roll"):
            if kind == "flip":
                dims = n.args[1:] if len(n.args) > 2 else _arg(n, 1, "dims")
            else:
                dims = _arg(n, 2, "dims")
            if dims is None or cd in _dims(dims, nd):
                raise GraphError(f"{where} reorders the channels (dim {cd}), which the graph cannot follow; {_OPS_HINT}")
            return cd
        if kind == "expand":
            cd_out = cd + out.ndim - nd
            if out.shape[cd_out] != c:
                raise GraphError(f"{where} broadcasts {c} channel(s) to {out.shape[cd_out]}")
            return cd_out
        if kind == "permute":
            dims = n.args[1:] if len(n.args) > 2 else _arg(n, 1, "dims")
            return _dims(dims, nd).index(cd)
        if kind == "transpose":
            a, b = _dims([_arg(n, 1, "dim0"), _arg(n, 2, "dim1")], nd)
            return b if cd == a else a if cd == b else cd
        if kind == "getitem":
            return self._index_dim(n.args[1], inp, cd)
        if kind == "reduce":
            dims = _arg(n, 1, "dim")
            keep = _arg(n, 2, "keepdim", False)
            if dims is None:
                return None
            dims = _dims(dims, nd)
            if cd in dims:
                return None
            return cd if keep else cd - sum(d < cd for d in dims)
        if kind == "flatten":
            if mod is not None:
                start, end = mod.start_dim, mod.end_dim
            else:
                start, end = _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1)
            start, end = _dims([start, end], nd) if nd else (0, 0)
            if cd < start:
                return cd
            if cd > end:
                return cd - (end - start)
            # the channels merge with the other dims in [start, end]: fine only if those are all 1
            return start if all(inp.shape[d] == 1 for d in range(start, end + 1) if d != cd) else None
        if kind == "unflatten":
            dim = mod.dim if mod is not None else _arg(n, 1, "dim")
            dim = int(dim) % nd
            k = out.ndim - nd + 1
            if cd < dim:
                return cd
            if cd > dim:
                return cd + k - 1
            sizes = list(out.shape[dim:dim + k])
            at = [i for i, s in enumerate(sizes) if s == c]
            ok = len(at) >= 1 and all(s == 1 for i, s in enumerate(sizes) if i != at[0])
            return dim + at[0] if ok else None
        if kind == "squeeze":
            dims = _arg(n, 1, "dim")
            dims = [d for d in range(nd) if inp.shape[d] == 1] if dims is None else \
                [d for d in _dims(dims, nd) if inp.shape[d] == 1]
            return None if cd in dims else cd - sum(d < cd for d in dims)
        if kind == "unsqueeze":
            d = int(_arg(n, 1, "dim")) % (nd + 1)
            return cd + (d <= cd)
        if kind == "reshape":
            d = self._reshape_dim(inp, out, cd, c)
            outer, inner = math.prod(inp.shape[:cd]), math.prod(inp.shape[cd + 1:])
            if d is None and c > 1 and any(math.prod(out.shape[:i]) == outer and math.prod(out.shape[j:]) == inner
                                           and math.prod(out.shape[i:j]) == c
                                           for i in range(out.ndim) for j in range(i + 2, out.ndim + 1)):
                raise GraphError(f"{where} splits the {c} channels over several dimensions {list(out.shape)} (as a "
                                 "channel shuffle or a split into heads does); the graph cannot follow channels "
                                 "through it")
            return d
        raise GraphError(f"{where}: internal error, no channel mapping for kind {kind!r}")  # pragma: no cover

    @staticmethod
    def _reshape_dim(inp: torch.Tensor, out: torch.Tensor, cd: int, c: int) -> int | None:
        """A reshape keeps the channels as one dim ``d`` if the elements before and after it are the
        same: ``prod(out[:d]) == prod(inp[:cd])``, ``out[d] == c``, ``prod(out[d+1:]) == prod(inp[cd+1:])``.
        Several ``d`` qualify only for ``c == 1`` next to other size-1 dims; then the one at the same
        position from the end (else from the start) is taken: any of them holds the same channel."""
        outer, inner = math.prod(inp.shape[:cd]), math.prod(inp.shape[cd + 1:])
        cands = [d for d in range(out.ndim) if out.shape[d] == c and math.prod(out.shape[:d]) == outer
                 and math.prod(out.shape[d + 1:]) == inner]
        if len(cands) <= 1:
            return cands[0] if cands else None
        for d in (out.ndim - (inp.ndim - cd), cd):
            if d in cands:
                return d
        return cands[0]

    def _channel_slice(self, n: fx.Node, inp: torch.Tensor, f: Flow) -> Flow | None:
        """``x[:, a:b]``: a contiguous part of the channels (ReXNet's ``x[:, 0:in_chs] + shortcut``): new nodes
        (role ``concat``) joined one-to-one to channels ``a .. b-1`` of the input, as a channel split's parts
        are. None if the channel dim is not indexed by such a slice (or the slice keeps every channel)."""
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            fill = inp.ndim - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        d_in, pos = 0, None
        for j, i in enumerate(idx):
            if i is None:
                continue
            if d_in == f.cdim:
                pos = j
                break
            d_in += 1
        if pos is None or not isinstance(idx[pos], slice) or idx[pos].step not in (None, 1) \
                or not all(isinstance(v, int) or v is None for v in (idx[pos].start, idx[pos].stop)):
            return None
        c = f.ns.size
        a, b, _ = idx[pos].indices(c)
        if b <= a or (a, b) == (0, c):
            return None
        cd = self._index_dim(idx[:pos] + (slice(None),) + idx[pos + 1:], inp, f.cdim)
        if cd is None:
            return None
        layer = self.b.new_layer(n.name, "slice")
        ns = self.b.new_nodes(b - a, "concat", f.ns.depth + 1, layer)
        self.b.identity_edges(f.ns, ns, layer, src_start=a)
        return Flow(ns, cd)

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
                # x[:, :k] with k >= C (GhostNet's out[:, :out_chs] when the concat is exactly out_chs wide)
                full = isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) and (
                    i.stop is None or (isinstance(i.stop, int) and i.stop >= inp.shape[cd]))
                return d_out if full else None
            if isinstance(i, slice):
                d_out += 1
            elif not isinstance(i, int):
                return None
            d_in += 1
        return d_out + (cd - d_in)

    def _arith(self, n: fx.Node, where: str, out: Any, arg_nodes: list[fx.Node]):
        """``+ - * /`` with scalars (channels stay), of two channel tensors (a merge node), or ``x + P``."""
        name = _op_name(n)
        tensors = [a for a in arg_nodes if isinstance(self.env.get(a), torch.Tensor)]
        chan = [a for a in tensors if isinstance(self.flows.get(a), Flow)]
        params = [a for a in tensors if isinstance(self.flows.get(a), ParamRef)]
        other = [a for a in tensors if a not in chan and a not in params]
        if other:
            raise GraphError(f"{where} combines channels with the tensor {other[0].name!r}, which holds no channels "
                             "the graph can follow (a constant, or channels reduced, sliced or reordered before)")
        extra = {k: v for k, v in n.kwargs.items() if not (k == "alpha" and v == 1)}
        if extra:
            raise GraphError(f"{where} with the arguments {sorted(extra)} cannot be represented")
        if not isinstance(out, torch.Tensor):
            raise GraphError(f"{where} returns {type(out).__name__}, not one tensor")
        if name in INPLACE and isinstance(n.args[0], fx.Node):
            target = n.args[0]
            later = [u.name for u in target.users if u is not n and self.order[u] > self.order[n]]
            if later:
                raise GraphError(f"the in-place operation {name!r} ({n.name}) changes {target.name!r}, which "
                                 f"{later[0]!r} reads afterwards; the graph cannot follow in-place changes: "
                                 "write `x = x + y` instead")
        kind = MERGE_KIND.get(name)
        if params:
            if kind == "add" and len(chan) == 1 and len(params) == 1:
                return self._add_embedding(n, out, self.env[chan[0]], self.flows[chan[0]], self.flows[params[0]])
            if kind == "mul" and len(chan) == 1 and len(params) == 1:
                return self._scale(n, out, self.env[chan[0]], self.flows[chan[0]], self.flows[params[0]])
            raise GraphError(f"the parameter {self.flows[params[0]].key!r} is used by {where}, which the graph "
                             f"has no rule for; supported layer types: {supported_types()}")
        if len(chan) == 1:  # with python scalars: elementwise
            a = chan[0]
            if tuple(out.shape) != tuple(self.env[a].shape):
                raise GraphError(f"{where} changes the shape {tuple(self.env[a].shape)} to {tuple(out.shape)}")
            return Flow(self.flows[a].ns, self.flows[a].cdim)
        if kind is None:
            raise GraphError(f"{where} divides channel tensors; the graph encodes only the sum, difference and "
                             "product of channel tensors")
        return self._merge(n, kind, where, out, chan)

    def _scale(self, n: fx.Node, out: torch.Tensor, inp: torch.Tensor, f: Flow, pr: ParamRef) -> Flow:
        """``x * g`` with g one value per channel (layer scale, shape ``(C, 1, 1)`` or ``(C,)``): new nodes
        (role ``linear``) with one edge per channel carrying ``g[c]`` (group ``k1``, role ``linear``: a
        diagonal 1x1 layer)."""
        p = self._param(pr.key)
        k = out.ndim - f.cdim
        ps = pr.shape or tuple(p.shape)  # as multiplied (after a view / reshape of the parameter)
        if tuple(out.shape) != tuple(inp.shape) or not (
                p.numel() == f.ns.size and len(ps) >= k and ps[len(ps) - k] == f.ns.size):
            raise GraphError(f"{n.name}{_in_module(n)}: multiplies by the parameter {pr.key!r} of shape {tuple(p.shape)}, which is "
                             f"not one value per channel of {f.ns.size} (a layer scale); the graph cannot encode it")
        layer = self.b.new_layer(n.name, "layer_scale")
        ns = self.b.new_nodes(f.ns.size, "linear", f.ns.depth + 1, layer)
        self.b.diag_edges("k1", f.ns, ns, p.detach().reshape(-1, 1), "linear", layer, key=pr.key,
                          shape=list(p.shape), dtype=p.dtype)
        return Flow(ns, f.cdim)

    def _merge(self, n: fx.Node, kind: str, where: str, out: torch.Tensor, args: list[fx.Node]) -> Flow:
        """Channel-wise ``a + b`` / ``a - b`` / ``a * b``: new nodes (role ``residual`` / ``difference`` /
        ``product``) with one identity edge per channel from each operand, feature -1 for a subtracted one."""
        fl = [self.flows[a] for a in args]
        if any(not f.plain for f in fl):
            raise GraphError(f"{where} merges flattened feature maps; the graph cannot encode it")
        sizes = [f.ns.size for f in fl]
        if len(set(sizes)) != 1:
            raise GraphError(f"{where} broadcasts tensors with {sizes} channels against each other; the graph "
                             "encodes only channel-wise merges of equal widths")
        from_end = {self.env[a].ndim - f.cdim for a, f in zip(args, fl)}
        cd = out.ndim - from_end.pop()
        if from_end or out.shape[cd] != sizes[0]:
            raise GraphError(f"{where}: the channels of its operands do not line up in one dimension; the graph "
                             "encodes only channel-wise merges")
        role = _MERGE_ROLE[kind]
        layer = self.b.new_layer(n.name, role)
        ns = self.b.new_nodes(sizes[0], role, max(f.ns.depth for f in fl) + 1, layer)
        for i, f in enumerate(fl):
            self.b.identity_edges(f.ns, ns, layer, value=-1.0 if kind == "sub" and i > 0 else 1.0)
        return Flow(ns, cd)

    def _cat(self, n: fx.Node, where: str, out: torch.Tensor) -> Flow:
        tensors = list(_arg(n, 0, "tensors"))
        dim = _arg(n, 1, "dim", 0)
        if not isinstance(out, torch.Tensor):
            raise GraphError(f"{where} returns {type(out).__name__}, not one tensor")
        dim %= out.ndim
        chan = [(a, self.flows[a]) for a in tensors if isinstance(a, fx.Node) and isinstance(self.flows.get(a), Flow)]
        params = [(a, self.flows[a]) for a in tensors if isinstance(a, fx.Node)
                  and isinstance(self.flows.get(a), ParamRef)]
        if len(chan) + len(params) != len(tensors):
            raise GraphError(f"{where} concatenates a tensor that holds no channels the graph can follow")
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
        return self.module.get_parameter(key) if key in self.param_keys else self.module.get_buffer(key)

    def _token_param(self, n: fx.Node, key: str, ns: NodeSet, cd: int, ndim: int) -> None:
        p = self._param(key)
        if p.numel() != ns.size or p.ndim != ndim or p.shape[cd] != ns.size:
            raise GraphError(f"{n.name}: the token parameter {key!r} of shape {tuple(p.shape)} is not one value per "
                             f"channel of {ns.size}; only single class tokens are supported")
        self.b.node_param(key, p, ns, [SLOT["token"]])

    def _add_embedding(self, n: fx.Node, out: torch.Tensor, inp: torch.Tensor, f: Flow, pr: ParamRef) -> Flow:
        """``x + P`` with P one vector per channel (slot ``bias`` of new nodes) or per (position, channel)
        (group ``pos`` from one node per position)."""
        p = self._param(pr.key)
        k = out.ndim - f.cdim  # the channels' position from the end, where a per-channel vector must sit
        ps = pr.shape or tuple(p.shape)  # as added (after a view / reshape of the parameter)
        per_channel = p.numel() == f.ns.size and len(ps) >= k and ps[len(ps) - k] == f.ns.size
        if tuple(out.shape) != tuple(inp.shape):
            raise GraphError(f"{n.name}: adding the parameter {pr.key!r} of shape {tuple(p.shape)} changes the "
                             "shape of the channel tensor")
        layer = self.b.new_layer(n.name, "add_parameter")
        ns = self.b.new_nodes(f.ns.size, "residual", f.ns.depth + 1, layer)
        self.b.identity_edges(f.ns, ns, layer)
        if per_channel:
            self.b.node_param(pr.key, p, ns, [SLOT["bias"]])
        elif len(ps) == out.ndim and f.cdim == out.ndim - 1 and ps[-1] == f.ns.size:
            t = p.numel() // f.ns.size
            pos = self.b.new_nodes(t, "position", 0, layer)
            self.b.dense_edges("pos", pos, ns, p.detach().reshape(-1, 1), "position", layer, outer="src",
                               key=pr.key, shape=list(p.shape), dtype=p.dtype)
        else:
            raise GraphError(f"{n.name}: adds the parameter {pr.key!r} of shape {tuple(p.shape)}, which is neither one "
                             "value per channel nor one per (position, channel) with channels last")
        return Flow(ns, f.cdim)


__all__ = ["ParamRef", "trace"]
