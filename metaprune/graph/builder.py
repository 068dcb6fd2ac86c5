"""Collects nodes, edges and the parameter layout while a model is traced, then fills the tensors.

Rules (``metaprune.graph.rules``) only *declare* blocks: "C new nodes", "this weight is a dense
block of edges from these nodes to those", "this vector sits in slot s of these nodes". The
builder turns the declarations into tensors with one vectorised operation per block (no Python
loop over channels or edges) and records, for every parameter and buffer, where it lives
(``layout``), which is all :func:`metaprune.graph.graph_params` needs to invert it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from metaprune.errors import GraphError
from metaprune.graph.graph import EDGE_ROLE, NODE_NEUTRAL, NODE_ROLE, NUM_NODE_FEATURES, EdgeGroup, Graph


@dataclass
class NodeSet:
    """A contiguous range of channel nodes ``[start, start + size)`` made by one layer."""

    start: int
    size: int
    depth: int
    layer: int
    used_slots: set[int] = field(default_factory=set)

    def ids(self) -> torch.Tensor:
        """Node ids as a tensor."""
        return torch.arange(self.start, self.start + self.size)


@dataclass
class _Block:
    """A block of edges: ``kind`` is 'dense' (outer x inner, row-major), 'grouped', 'diag' or 'perm'."""

    kind: str
    src: NodeSet
    dst: NodeSet
    offset: int
    count: int
    role: int
    layer: int
    outer: str = "dst"   # dense: which side varies slowest
    groups: int = 1
    src_start: int = 0   # first source channel used (inside src)
    value: torch.Tensor | None = None   # [count, D] view to copy in (None: the constant ``fill``)
    fill: float = 1.0
    perm: torch.Tensor | None = None    # 'perm': dst[c] reads src[perm[c]]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one thread: the fills here are memory-bound, and on a busy
    machine intra-op threads cost far more in synchronisation than they gain (measured 100x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class GraphBuilder:
    """Accumulates the graph of one model; see the module docstring."""

    def __init__(self) -> None:
        self.num_nodes = 0
        self.num_layers = 0
        self.node_sets: list[tuple[NodeSet, int]] = []      # (set, role)
        self.node_values: list[tuple[NodeSet, list[int], torch.Tensor]] = []
        self.blocks: dict[str, list[_Block]] = {}
        self.group_dim: dict[str, int] = {}
        self.group_size: dict[str, int] = {}
        self.layout: list[dict] = []
        self.layers: list[dict] = [{"id": 0, "name": "input", "type": "input"}]
        self.output_flow = None
        self.dtype = torch.float32   # of the features: the widest floating dtype declared (exact round trip)

    def _widen(self, t: torch.Tensor | None) -> None:
        if t is not None and t.is_floating_point():
            self.dtype = torch.promote_types(self.dtype, t.dtype)

    # ------------------------------------------------------------------ nodes
    def new_layer(self, name: str, type_: str) -> int:
        """Register a layer (anything that creates nodes); returns its id."""
        self.num_layers += 1
        self.layers.append({"id": self.num_layers, "name": name, "type": type_})
        return self.num_layers

    def new_nodes(self, size: int, role: str, depth: int, layer: int) -> NodeSet:
        """``size`` new nodes with ``role``."""
        ns = NodeSet(self.num_nodes, int(size), depth, layer)
        self.num_nodes += int(size)
        self.node_sets.append((ns, NODE_ROLE[role]))
        return ns

    def set_role(self, ns: NodeSet, role: str) -> None:
        """Change the role of a node set (e.g. mark the network's output)."""
        self.node_sets = [(s, NODE_ROLE[role] if s is ns else r) for s, r in self.node_sets]

    def node_param(self, key: str, tensor: torch.Tensor, ns: NodeSet, slots: list[int]) -> None:
        """Put ``tensor`` (``len(slots) * ns.size`` values, slot-major) into ``slots`` of ``ns``."""
        if tensor.numel() != len(slots) * ns.size:
            raise GraphError(f"{key}: {tensor.numel()} values do not fit {ns.size} channels x {len(slots)} slots")
        taken = ns.used_slots.intersection(slots)
        if taken:
            raise GraphError(f"{key}: node slots {sorted(taken)} are already used (internal rule conflict)")
        ns.used_slots.update(slots)
        self._widen(tensor)
        self.node_values.append((ns, list(slots), tensor.detach().cpu().reshape(len(slots), ns.size)))
        self.layout.append({"key": key, "kind": "node", "start": ns.start, "count": ns.size, "slots": list(slots),
                            "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")})

    def constant(self, key: str, tensor: torch.Tensor) -> None:
        """A non-channel tensor (e.g. ``num_batches_tracked``) kept verbatim in the spec."""
        if tensor.numel() != 1:
            raise GraphError(f"{key}: only scalar constants can be kept outside the graph (shape {tuple(tensor.shape)})")
        self.layout.append({"key": key, "kind": "const", "value": tensor.item(), "shape": list(tensor.shape),
                            "dtype": str(tensor.dtype).removeprefix("torch.")})

    # ------------------------------------------------------------------ edges
    def _reserve(self, group: str, dim: int, count: int) -> int:
        if self.group_dim.setdefault(group, dim) != dim:
            raise GraphError(f"edge group {group!r} has {self.group_dim[group]} features, not {dim}")
        off = self.group_size.get(group, 0)
        self.group_size[group] = off + count
        return off

    def dense_edges(self, group: str, src: NodeSet, dst: NodeSet, value: torch.Tensor | None, role: str,
                    layer: int, *, outer: str = "dst", key: str | None = None, view: str = "oi",
                    shape: list[int] | None = None, dtype: torch.dtype | None = None, dim: int = 1) -> None:
        """All ``src`` x ``dst`` edges, row-major with ``outer`` varying slowest; ``value`` is [E, D]."""
        count = src.size * dst.size
        d = dim if value is None else int(value.shape[1])
        off = self._reserve(group, d, count)
        self._widen(value)
        self.blocks.setdefault(group, []).append(
            _Block("dense", src, dst, off, count, EDGE_ROLE[role], layer, outer=outer, value=value))
        if key is not None:
            self._edge_layout(key, group, off, count, view, shape, dtype)

    def grouped_edges(self, group: str, src: NodeSet, dst: NodeSet, groups: int, value: torch.Tensor, role: str,
                      layer: int, *, key: str, shape: list[int], dtype: torch.dtype) -> None:
        """Edges of a grouped conv: output ``o`` sees only the inputs of its group; row-major (o, i)."""
        count = dst.size * (src.size // groups)
        off = self._reserve(group, int(value.shape[1]), count)
        self._widen(value)
        self.blocks.setdefault(group, []).append(
            _Block("grouped", src, dst, off, count, EDGE_ROLE[role], layer, groups=groups, value=value))
        self._edge_layout(key, group, off, count, "oi", shape, dtype)

    def identity_edges(self, src: NodeSet, dst: NodeSet, layer: int, src_start: int = 0, value: float = 1.0) -> None:
        """One edge per channel, ``src[src_start + c] -> dst[c]``, feature ``value`` (1, or -1 for a
        subtracted operand), in group ``id``."""
        off = self._reserve("id", 1, dst.size)
        self.blocks.setdefault("id", []).append(
            _Block("diag", src, dst, off, dst.size, EDGE_ROLE["identity"], layer, src_start=src_start, fill=value))

    def perm_edges(self, src: NodeSet, dst: NodeSet, perm: torch.Tensor, layer: int) -> None:
        """One identity edge per channel, ``src[perm[c]] -> dst[c]`` (a channel permutation), group ``id``."""
        off = self._reserve("id", 1, dst.size)
        self.blocks.setdefault("id", []).append(
            _Block("perm", src, dst, off, dst.size, EDGE_ROLE["identity"], layer, perm=perm.clone()))

    def diag_edges(self, group: str, src: NodeSet, dst: NodeSet, value: torch.Tensor, role: str, layer: int, *,
                   key: str, shape: list[int], dtype: torch.dtype) -> None:
        """One edge per channel ``src[c] -> dst[c]`` carrying ``value[c]`` ([C, D]): a channel-wise
        scale (layer scale), i.e. a diagonal 1x1 layer."""
        off = self._reserve(group, int(value.shape[1]), dst.size)
        self._widen(value)
        self.blocks.setdefault(group, []).append(
            _Block("diag", src, dst, off, dst.size, EDGE_ROLE[role], layer, value=value))
        self._edge_layout(key, group, off, dst.size, "oi", shape, dtype)

    def _edge_layout(self, key, group, off, count, view, shape, dtype) -> None:
        self.layout.append({"key": key, "kind": "edge", "group": group, "offset": off, "count": count,
                            "view": view, "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")})

    # ------------------------------------------------------------------ build
    def build(self, spec: dict) -> Graph:
        """Materialise the tensors of the graph."""
        with single_thread():
            return self._build(spec)

    def _build(self, spec: dict) -> Graph:
        n = self.num_nodes
        x = torch.tensor(NODE_NEUTRAL, dtype=self.dtype).repeat(n, 1)
        mask = torch.zeros(n, NUM_NODE_FEATURES, dtype=torch.bool)
        role = torch.empty(n, dtype=torch.long)
        layer = torch.empty(n, dtype=torch.long)
        depth = torch.empty(n, dtype=torch.long)
        for ns, r in self.node_sets:
            sl = slice(ns.start, ns.start + ns.size)
            role[sl], layer[sl], depth[sl] = r, ns.layer, ns.depth
        for ns, slots, vals in self.node_values:
            sl = slice(ns.start, ns.start + ns.size)
            x[sl, slots] = vals.t().to(self.dtype)
            mask[sl, slots] = True
        edges = {g: self._build_group(g, blocks) for g, blocks in self.blocks.items()}
        return Graph(x, mask, role, layer, depth, edges, spec)

    def _build_group(self, group: str, blocks: list[_Block]) -> EdgeGroup:
        e, d = self.group_size[group], self.group_dim[group]
        index = torch.empty(2, e, dtype=torch.long)
        attr = torch.empty(e, d, dtype=self.dtype)
        role = torch.empty(e, dtype=torch.long)
        layer = torch.empty(e, dtype=torch.long)
        for b in blocks:
            sl = slice(b.offset, b.offset + b.count)
            role[sl] = b.role
            layer[sl] = b.layer
            if b.value is None:
                attr[sl] = b.fill
            else:
                attr[sl] = b.value
            src_i, dst_i = index[0, sl], index[1, sl]
            if b.kind == "perm":
                torch.add(b.perm, b.src.start, out=src_i)
                torch.arange(b.dst.start, b.dst.start + b.count, out=dst_i)
            elif b.kind == "diag":
                torch.arange(b.src.start + b.src_start, b.src.start + b.src_start + b.count, out=src_i)
                torch.arange(b.dst.start, b.dst.start + b.count, out=dst_i)
            elif b.kind == "dense":
                s_ar = torch.arange(b.src.start, b.src.start + b.src.size)
                d_ar = torch.arange(b.dst.start, b.dst.start + b.dst.size)
                if b.outer == "dst":
                    src_i.view(b.dst.size, b.src.size).copy_(s_ar.view(1, -1))
                    dst_i.view(b.dst.size, b.src.size).copy_(d_ar.view(-1, 1))
                else:
                    src_i.view(b.src.size, b.dst.size).copy_(s_ar.view(-1, 1))
                    dst_i.view(b.src.size, b.dst.size).copy_(d_ar.view(1, -1))
            else:  # grouped: output o (group o // og) sees inputs g*ig .. g*ig+ig-1
                g, og, ig = b.groups, b.dst.size // b.groups, b.src.size // b.groups
                base = b.src.start + torch.arange(g).view(g, 1, 1) * ig + torch.arange(ig).view(1, 1, ig)
                src_i.view(g, og, ig).copy_(base)
                dst_i.view(g, og, ig).copy_(torch.arange(b.dst.start, b.dst.start + b.dst.size).view(g, og, 1))
        return EdgeGroup(index, attr, role, layer)
