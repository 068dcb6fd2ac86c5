"""Network <-> graph conversion.

``to_graph(model) -> Graph`` turns a network into a graph with one node per channel and one edge
per (input channel, output channel) weight slice; ``from_graph(graph) -> nn.Module`` is its exact
inverse, and ``graph_params(graph, x, edge_attr)`` the differentiable map from (edited) features
to the network's parameters. The channel structure comes from tracing the model with torch.fx;
each layer type has one encode rule in :mod:`metaprune.graph.rules`, and the parameter-free
operations the tracer may follow are an explicit allow-list in :mod:`metaprune.graph.ops`.
"""

from metaprune.graph.convert import build_module, clear_cache, from_graph, graph_params, to_graph
from metaprune.graph.graph import (
    EDGE_ROLES,
    NODE_NEUTRAL,
    NODE_ROLES,
    NODE_SLOTS,
    NUM_NODE_FEATURES,
    EdgeGroup,
    Graph,
    GraphFileError,
    is_graph_file,
    validate_graph,
)
from metaprune.graph.ops import register_channel_op
from metaprune.graph.rules import RULES, register_rule

__all__ = [
    "EDGE_ROLES",
    "NODE_NEUTRAL",
    "NODE_ROLES",
    "NODE_SLOTS",
    "NUM_NODE_FEATURES",
    "RULES",
    "EdgeGroup",
    "Graph",
    "GraphFileError",
    "build_module",
    "clear_cache",
    "from_graph",
    "graph_params",
    "is_graph_file",
    "register_channel_op",
    "register_rule",
    "to_graph",
    "validate_graph",
]
