"""Network <-> graph conversion.

``to_graph(model) -> Graph`` turns a network into a graph with one node per channel and one edge
per (input channel, output channel) weight slice; ``from_graph(graph) -> nn.Module`` is its exact
inverse, and ``graph_params(graph, x, edge_attr)`` the differentiable map from (edited) features
to the network's parameters. The channel structure comes from tracing the model with torch.fx;
each layer type has one encode rule in :mod:`metaprune.graph.rules`.
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
    is_graph_file,
)
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
    "build_module",
    "clear_cache",
    "from_graph",
    "graph_params",
    "is_graph_file",
    "register_rule",
    "to_graph",
]
