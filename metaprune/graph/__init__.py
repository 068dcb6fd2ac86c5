"""Network <-> graph conversion.

``to_graph(model) -> Graph`` turns a network into a graph with one node per channel and one edge
per (input channel, output channel) weight slice; ``from_graph(graph) -> nn.Module`` is its exact
inverse, and ``graph_params(graph, x, edge_attr)`` the differentiable map from (edited) features
to the network's parameters. The channel structure comes from tracing the model with torch.fx;
each layer type has one encode rule in :mod:`metaprune.graph.rules`, and the parameter-free
operations the tracer may follow are an explicit allow-list in :mod:`metaprune.graph.ops`.

Any module converts, not only registered architectures: ``to_graph(model, input_shape=(1, 3, 64, 64))``
traces it at that input, and ``from_graph(graph, template=model_of_the_same_widths)`` rebuilds it
onto a copy of the template. Every torchvision classification builder converts exactly except
Swin (shifted-window attention) and MaxViT (relative-position attention), which are refused with
a :class:`~metaprune.errors.GraphError` naming the module (``tools/convert_coverage.py``).
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
