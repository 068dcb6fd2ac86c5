"""The :class:`Graph` data structure: one node per channel, one edge per (input channel, output channel).

Node features ``x`` have a fixed slot layout (:data:`NODE_SLOTS`); a slot a node does not use holds
the neutral value of :data:`NODE_NEUTRAL` and is ``False`` in ``x_mask``:

====  ===========  =====================================================================
slot  name         holds
====  ===========  =====================================================================
0     bn_weight    weight of the BatchNorm that normalises this channel
1     bn_bias      bias of that BatchNorm
2     bn_mean      its running mean
3     bn_var       its running variance
4     bias         bias of the conv / linear layer that produced this channel
5     ln_weight    weight of the LayerNorm that reads this channel
6     ln_bias      bias of that LayerNorm
7-9   q/k/v_bias   query / key / value bias of an attention dimension
10    token        class-token value of a residual-stream channel
====  ===========  =====================================================================

Edges come in groups keyed by feature kind: ``k1`` (1x1 convs, linears), ``k9`` (3x3), ``k49``
(7x7), ``k256`` / ``k16`` (patch kernels), ``qkv3`` (query/key/value weights of one attention
dimension), ``id`` (residual and concat identities, one edge per channel, feature 1), ``pos``
(position embeddings, from one node per token position). Row 0 of an edge index is the source
(input channel), row 1 the target (output channel). Identity edges carry feature 1, or -1 from the
subtracted operand of a difference; the node they lead to says how its inputs merge (role
``residual``: sum, ``difference``, ``product``: channel-wise product, e.g. a squeeze-excitation gate).

Features are float32, or float64 when the model has float64 tensors (the widest floating dtype of
the model, so that every value round-trips exactly).

A graph file is untrusted input: :meth:`Graph.load` checks every tensor's dtype and shape, every
index range and the whole JSON spec (dtype names from a whitelist) before anything is built, and
raises :class:`GraphFileError` (a :class:`~metaprune.errors.GraphError`) naming what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from metaprune.errors import GraphError, ModelFileError

GRAPH_FORMAT_VERSION = 1
GRAPH_META_KEY = "metaprune_graph"

NODE_SLOTS: tuple[str, ...] = ("bn_weight", "bn_bias", "bn_mean", "bn_var", "bias", "ln_weight", "ln_bias",
                               "q_bias", "k_bias", "v_bias", "token")
NODE_NEUTRAL: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
SLOT = {name: i for i, name in enumerate(NODE_SLOTS)}
NUM_NODE_FEATURES = len(NODE_SLOTS)

#: node role ids (index into this tuple)
NODE_ROLES: tuple[str, ...] = ("input", "conv", "linear", "attention", "residual", "concat", "norm",
                               "position", "output", "difference", "product")
#: edge role ids (index into this tuple)
EDGE_ROLES: tuple[str, ...] = ("conv", "grouped_conv", "patch", "linear", "qkv", "attn_out", "identity",
                               "position")
NODE_ROLE = {name: i for i, name in enumerate(NODE_ROLES)}
EDGE_ROLE = {name: i for i, name in enumerate(EDGE_ROLES)}

#: the dtype names a graph spec may hold (never ``getattr(torch, name)`` on file contents)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
#: the dtypes node and edge features may have
FEATURE_DTYPES = (torch.float32, torch.float64)


class GraphFileError(GraphError, ModelFileError):
    """A graph file is unreadable, incomplete or inconsistent (both a graph and a file error)."""


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype of a spec's dtype name, from the whitelist :data:`DTYPES`."""
    if not isinstance(name, str) or name not in DTYPES:
        raise GraphError(f"unknown tensor dtype {name!r} in the graph spec; known: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class EdgeGroup:
    """One kind of edge: ``index`` [2, E] (source row, target row), ``attr`` [E, D], ``role`` and ``layer`` [E]."""

    index: torch.Tensor
    attr: torch.Tensor
    role: torch.Tensor
    layer: torch.Tensor

    @property
    def num_edges(self) -> int:
        """Number of edges."""
        return int(self.index.shape[1])

    @property
    def feature_dim(self) -> int:
        """Features per edge."""
        return int(self.attr.shape[1])


@dataclass
class Graph:
    """A network as a graph of channels. Build with :func:`metaprune.graph.to_graph`.

    Attributes:
        x: node features [N, F] (float32, or float64 for a float64 model), slots as in :data:`NODE_SLOTS`.
        x_mask: which slots of ``x`` hold real parameters [N, F] (bool).
        node_role: role id of each node (index into :data:`NODE_ROLES`).
        node_layer: id of the layer that created the node (0 = the input).
        node_depth: topological depth of the node (0 = the input).
        edges: edge groups keyed by feature kind.
        spec: JSON-able description: the architecture spec, widths, and the layout that maps
            features back to the model's parameters and buffers.
    """

    x: torch.Tensor
    x_mask: torch.Tensor
    node_role: torch.Tensor
    node_layer: torch.Tensor
    node_depth: torch.Tensor
    edges: dict[str, EdgeGroup]
    spec: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        """Number of edges over all groups."""
        return sum(g.num_edges for g in self.edges.values())

    def edge_attr(self) -> dict[str, torch.Tensor]:
        """The edge features of every group (the default ``edge_attr`` of :func:`graph_params`)."""
        return {k: g.attr for k, g in self.edges.items()}

    def describe(self) -> dict:
        """Sizes: nodes, node feature size, and per edge group its edge count and feature size."""
        return {
            "arch": self.spec.get("arch"),
            "nodes": self.num_nodes,
            "node_features": int(self.x.shape[1]),
            "edges": self.num_edges,
            "edge_groups": {k: {"edges": g.num_edges, "features": g.feature_dim} for k, g in self.edges.items()},
            "layers": len(self.spec.get("layers", [])),
        }

    def to(self, device: str | torch.device) -> Graph:
        """A copy of the graph on ``device``."""
        eg = {k: EdgeGroup(*(t.to(device) for t in (g.index, g.attr, g.role, g.layer))) for k, g in self.edges.items()}
        return Graph(self.x.to(device), self.x_mask.to(device), self.node_role.to(device),
                     self.node_layer.to(device), self.node_depth.to(device), eg, self.spec)

    def astype(self, dtype: torch.dtype) -> Graph:
        """The graph with node and edge features in ``dtype`` (the same graph if they already are)."""
        if self.x.dtype == dtype and all(g.attr.dtype == dtype for g in self.edges.values()):
            return self
        eg = {k: EdgeGroup(g.index, g.attr.to(dtype), g.role, g.layer) for k, g in self.edges.items()}
        return Graph(self.x.to(dtype), self.x_mask, self.node_role, self.node_layer, self.node_depth, eg, self.spec)

    def to_pyg(self, hetero: bool = False):
        """As PyG data: a homogeneous ``Data`` (edge groups kept as ``edge_index_<g>`` / ``edge_attr_<g>``
        / ``edge_role_<g>`` / ``edge_layer_<g>`` attributes) or, with ``hetero=True``, a ``HeteroData`` with
        node type ``"channel"`` and one edge type ``("channel", g, "channel")`` per group."""
        from torch_geometric.data import Data, HeteroData

        if hetero:
            data = HeteroData()
            data["channel"].x = self.x
            data["channel"].x_mask = self.x_mask
            data["channel"].role = self.node_role
            data["channel"].layer = self.node_layer
            data["channel"].depth = self.node_depth
            for k, g in self.edges.items():
                store = data["channel", k, "channel"]
                store.edge_index, store.edge_attr, store.role, store.layer = g.index, g.attr, g.role, g.layer
            return data
        data = Data(x=self.x, x_mask=self.x_mask, node_role=self.node_role, node_layer=self.node_layer,
                    node_depth=self.node_depth, num_nodes=self.num_nodes)
        for k, g in self.edges.items():
            data[f"edge_index_{k}"] = g.index
            data[f"edge_attr_{k}"] = g.attr
            data[f"edge_role_{k}"] = g.role
            data[f"edge_layer_{k}"] = g.layer
        data.edge_groups = list(self.edges)
        return data

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, inputs: tuple = ()) -> Path:
        """Write the graph as one ``.safetensors`` file (tensors + JSON spec in its metadata), atomically."""
        from metaprune.io import atomic_path, check_output

        p = Path(path)
        check_output(p, inputs)
        tensors = {"x": self.x, "x_mask": self.x_mask, "node_role": self.node_role,
                   "node_layer": self.node_layer, "node_depth": self.node_depth}
        for k, g in self.edges.items():
            tensors.update({f"edges.{k}.index": g.index, f"edges.{k}.attr": g.attr,
                            f"edges.{k}.role": g.role, f"edges.{k}.layer": g.layer})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {GRAPH_META_KEY: json.dumps({"format_version": GRAPH_FORMAT_VERSION, "groups": list(self.edges),
                                            "spec": self.spec})}
        with atomic_path(p) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graph:
        """Read a graph written by :meth:`save` (no pickle). Everything is validated first (see
        :func:`validate_graph`); a bad file raises :class:`GraphFileError`."""
        from metaprune.io import safetensors_header

        p = Path(path)
        if not p.is_file():
            raise GraphFileError(f"graph file {p} does not exist" if not p.exists() else f"{p} is not a file")
        meta, shapes = safetensors_header(p, error=GraphFileError)  # the header: no tensor data read yet
        if GRAPH_META_KEY not in meta:
            raise GraphFileError(f"{p} is not a metaprune graph (no '{GRAPH_META_KEY}' metadata); "
                                 "write graphs with `metaprune convert MODEL -o graph.safetensors`")
        try:
            head = json.loads(meta[GRAPH_META_KEY])
        except (ValueError, RecursionError):
            raise GraphFileError(f"{p}: the graph metadata is not valid JSON; the file is corrupt") from None
        try:
            validate_graph(head, shapes, values=False)  # names, dtypes, shapes and the spec, from the header
        except GraphError as e:
            raise GraphFileError(f"{p}: {e}") from None
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError, OverflowError) as e:
            raise GraphFileError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e!r})"
                                 "; it may be truncated or corrupt") from None
        try:
            validate_graph(head, tensors)
        except GraphError as e:
            raise GraphFileError(f"{p}: {e}") from None
        edges = {k: EdgeGroup(tensors[f"edges.{k}.index"], tensors[f"edges.{k}.attr"],
                              tensors[f"edges.{k}.role"], tensors[f"edges.{k}.layer"]) for k in head["groups"]}
        return cls(tensors["x"], tensors["x_mask"], tensors["node_role"], tensors["node_layer"],
                   tensors["node_depth"], edges, head["spec"])


# ---------------------------------------------------------------------------- validation of graph files
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_MAX_DIMS = 8


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise GraphError(what)


def _int(v: Any, what: str, lo: int = 0) -> int:
    _need(_is_int(v) and v >= lo, f"{what} must be an integer >= {lo}, not {v!r}")
    return v


def _shape(v: Any, what: str) -> list[int]:
    _need(isinstance(v, list) and len(v) <= _MAX_DIMS and all(_is_int(d) and d >= 0 for d in v),
          f"{what} must be a list of at most {_MAX_DIMS} non-negative integers, not {v!r}")
    return v


def _validate_spec(spec: Any, groups: dict[str, tuple[int, int]], n_nodes: int) -> None:
    """The JSON spec: types, names, dtype names and every layout range against the tensors."""
    _need(isinstance(spec, dict), "the spec must be a JSON object")
    for k in ("arch", "arch_args", "layout"):
        _need(k in spec, f"the spec lacks {k!r}")
    _need(isinstance(spec["arch"], str) and 0 < len(spec["arch"]) <= 200, f"spec.arch must be a name, not {spec['arch']!r}")
    args = spec["arch_args"]
    _need(isinstance(args, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (int, float, str, bool)))
                                         for k, v in args.items()),
          "spec.arch_args must be an object of numbers, strings and booleans")
    widths = spec.get("widths", {})
    _need(isinstance(widths, dict), "spec.widths must be an object")
    for name, attrs in widths.items():
        _need(isinstance(attrs, dict) and all(
            isinstance(a, str) and (_is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)))
            for a, v in attrs.items()), f"spec.widths[{name!r}] must map attribute names to integers")
    _need(isinstance(spec.get("training", False), bool), "spec.training must be true or false")
    if "input_shape" in spec:
        _shape(spec["input_shape"], "spec.input_shape")
    layers = spec.get("layers", [])
    _need(isinstance(layers, list) and all(isinstance(x, dict) for x in layers), "spec.layers must be a list of objects")
    layout = spec["layout"]
    _need(isinstance(layout, list), "spec.layout must be a list")
    seen: set[str] = set()
    for i, e in enumerate(layout):
        where = f"spec.layout[{i}]"
        _need(isinstance(e, dict), f"{where} must be an object")
        key = e.get("key")
        _need(isinstance(key, str) and key and key not in seen, f"{where}.key must be a new tensor name, not {key!r}")
        seen.add(key)
        where = f"{where} ({key})"
        kind = e.get("kind")
        shape = _shape(e.get("shape"), f"{where}.shape")
        numel = math.prod(shape)
        dtype_from_name(e.get("dtype"))
        _need(isinstance(e.get("buffer", False), bool), f"{where}.buffer must be true or false")
        if kind == "node":
            start, count = _int(e.get("start"), f"{where}.start"), _int(e.get("count"), f"{where}.count")
            slots = e.get("slots")
            _need(isinstance(slots, list) and slots and len(set(map(str, slots))) == len(slots)
                  and all(_is_int(s) and 0 <= s < NUM_NODE_FEATURES for s in slots),
                  f"{where}.slots must be distinct slot numbers 0..{NUM_NODE_FEATURES - 1}")
            _need(start + count <= n_nodes, f"{where} covers nodes {start}..{start + count - 1}, "
                                            f"but the graph has {n_nodes}")
            _need(numel == count * len(slots), f"{where}: shape {shape} does not hold {count} x {len(slots)} values")
        elif kind == "edge":
            g = e.get("group")
            _need(isinstance(g, str) and g in groups, f"{where}.group {g!r} is not an edge group of the file")
            n_edges, dim = groups[g]
            off, count = _int(e.get("offset"), f"{where}.offset"), _int(e.get("count"), f"{where}.count")
            _need(off + count <= n_edges, f"{where} covers edges {off}..{off + count - 1} of group {g!r}, "
                                          f"which has {n_edges}")
            view = e.get("view")
            _need(view in ("oi", "qkv"), f"{where}.view must be 'oi' or 'qkv', not {view!r}")
            if view == "qkv":
                _need(dim == 3 and len(shape) == 2 and shape[0] % 3 == 0 and count == shape[0] // 3 * shape[1],
                      f"{where}: a qkv weight of shape {shape} does not fit {count} edges x {dim} features")
            else:
                _need(numel == count * dim, f"{where}: shape {shape} does not hold {count} edges x {dim} features")
        elif kind == "const":
            v = e.get("value")
            _need(isinstance(v, (int, float, bool)) and numel == 1 and math.isfinite(v),
                  f"{where}: a constant must be one finite number")
        else:
            raise GraphError(f"{where}.kind must be 'node', 'edge' or 'const', not {kind!r}")
    keys = spec.get("keys")
    if keys is not None:
        _need(isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys)
              and set(keys) == seen, "spec.keys must list every tensor of spec.layout once")


def validate_graph(head: Any, tensors: dict[str, torch.Tensor], values: bool = True) -> None:
    """Check a graph file's header (``{"format_version", "groups", "spec"}``) and tensors: dtypes,
    shapes, index ranges, finite features, and the spec (:func:`_validate_spec`). Raises
    :class:`~metaprune.errors.GraphError` naming the first problem. ``values=False`` checks
    everything but the tensors' values (index ranges, finiteness), so ``tensors`` may be meta
    placeholders read from a file's header."""
    _need(isinstance(head, dict), "the graph metadata must be a JSON object")
    ver = head.get("format_version")
    _need(_is_int(ver) and ver >= 1, f"format_version must be a positive integer, not {ver!r}")
    _need(ver <= GRAPH_FORMAT_VERSION, f"graph format_version {ver} is newer than this metaprune "
                                       f"({GRAPH_FORMAT_VERSION}); upgrade metaprune")
    names = head.get("groups")
    _need(isinstance(names, list) and all(isinstance(g, str) and _NAME.match(g) for g in names)
          and len(set(names)) == len(names), "groups must be a list of distinct edge group names")
    want = {"x", "x_mask", "node_role", "node_layer", "node_depth"}
    want |= {f"edges.{g}.{t}" for g in names for t in ("index", "attr", "role", "layer")}
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    _need(not missing, f"the tensor(s) {missing[:4]} are missing; the graph file is incomplete")
    _need(not extra, f"unexpected tensor(s) {extra[:4]}; not a graph written by metaprune")
    x = tensors["x"]
    _need(x.dtype in FEATURE_DTYPES, f"node features x must be float32 or float64, not {x.dtype}")
    _need(x.ndim == 2 and x.shape[1] == NUM_NODE_FEATURES,
          f"node features x must have shape [nodes, {NUM_NODE_FEATURES}], not {list(x.shape)}")
    n = int(x.shape[0])
    _need(not values or bool(torch.isfinite(x).all()), "node features x hold NaN or infinite values")
    _need(tensors["x_mask"].dtype == torch.bool and tensors["x_mask"].shape == x.shape,
          f"x_mask must be bool of shape {list(x.shape)}")

    def ids(name: str, length: int, hi: int | None) -> None:
        t = tensors[name]
        _need(t.dtype == torch.int64 and t.shape == (length,), f"{name} must be int64 of shape [{length}]")
        if length and values:
            _need(int(t.min()) >= 0 and (hi is None or int(t.max()) < hi),
                  f"{name} holds values outside 0..{'' if hi is None else hi - 1}")

    ids("node_role", n, len(NODE_ROLES))
    ids("node_layer", n, None)
    ids("node_depth", n, None)
    groups: dict[str, tuple[int, int]] = {}
    for g in names:
        index, attr = tensors[f"edges.{g}.index"], tensors[f"edges.{g}.attr"]
        _need(index.dtype == torch.int64 and index.ndim == 2 and index.shape[0] == 2,
              f"edges.{g}.index must be int64 of shape [2, edges], not {index.dtype} {list(index.shape)}")
        e = int(index.shape[1])
        if e and values:
            _need(int(index.min()) >= 0 and int(index.max()) < n,
                  f"edges.{g}.index refers to nodes outside 0..{n - 1}")
        _need(attr.dtype == x.dtype and attr.ndim == 2 and attr.shape[0] == e and attr.shape[1] >= 1,
              f"edges.{g}.attr must be {x.dtype} of shape [{e}, features], not {attr.dtype} {list(attr.shape)}")
        _need(not values or bool(torch.isfinite(attr).all()), f"edges.{g}.attr holds NaN or infinite values")
        ids(f"edges.{g}.role", e, len(EDGE_ROLES))
        ids(f"edges.{g}.layer", e, None)
        groups[g] = (e, int(attr.shape[1]))
    _validate_spec(head.get("spec"), groups, n)


def is_graph_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.safetensors`` file holding a metaprune graph."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt") as f:
            return GRAPH_META_KEY in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False
