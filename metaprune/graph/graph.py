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
(input channel), row 1 the target (output channel).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from metaprune.errors import ModelFileError

GRAPH_FORMAT_VERSION = 1
GRAPH_META_KEY = "metaprune_graph"

NODE_SLOTS: tuple[str, ...] = ("bn_weight", "bn_bias", "bn_mean", "bn_var", "bias", "ln_weight", "ln_bias",
                               "q_bias", "k_bias", "v_bias", "token")
NODE_NEUTRAL: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
SLOT = {name: i for i, name in enumerate(NODE_SLOTS)}
NUM_NODE_FEATURES = len(NODE_SLOTS)

#: node role ids (index into this tuple)
NODE_ROLES: tuple[str, ...] = ("input", "conv", "linear", "attention", "residual", "concat", "norm",
                               "position", "output")
#: edge role ids (index into this tuple)
EDGE_ROLES: tuple[str, ...] = ("conv", "grouped_conv", "patch", "linear", "qkv", "attn_out", "identity",
                               "position")
NODE_ROLE = {name: i for i, name in enumerate(NODE_ROLES)}
EDGE_ROLE = {name: i for i, name in enumerate(EDGE_ROLES)}


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
        x: node features [N, F] (float32), slots as in :data:`NODE_SLOTS`.
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
        """Read a graph written by :meth:`save` (no pickle)."""
        p = Path(path)
        if not p.exists():
            raise ModelFileError(f"graph file {p} does not exist")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{p} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
        if GRAPH_META_KEY not in meta:
            raise ModelFileError(f"{p} is not a metaprune graph (no '{GRAPH_META_KEY}' metadata); "
                                 "write graphs with `metaprune convert MODEL -o graph.safetensors`")
        try:
            head = json.loads(meta[GRAPH_META_KEY])
        except json.JSONDecodeError:
            raise ModelFileError(f"{p}: the graph metadata is corrupt") from None
        if int(head.get("format_version", 0)) > GRAPH_FORMAT_VERSION:
            raise ModelFileError(f"{p} has graph format_version {head['format_version']}, newer than this metaprune "
                                 f"({GRAPH_FORMAT_VERSION}); upgrade metaprune")
        try:
            edges = {k: EdgeGroup(tensors[f"edges.{k}.index"], tensors[f"edges.{k}.attr"],
                                  tensors[f"edges.{k}.role"], tensors[f"edges.{k}.layer"]) for k in head["groups"]}
            return cls(tensors["x"], tensors["x_mask"], tensors["node_role"], tensors["node_layer"],
                       tensors["node_depth"], edges, head["spec"])
        except KeyError as e:
            raise ModelFileError(f"{p} lacks the tensor {e}; the graph file is incomplete") from None


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
