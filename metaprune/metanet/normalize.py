"""Per-layer normalisation of graph features (and the inverse map for the metanetwork's edits).

Raw weights and BN statistics differ by orders of magnitude between layers and slots, so the
metanetwork reads them normalised per layer: node slot ``f`` of layer ``l`` by its mean and
standard deviation over that layer's real (``x_mask``) entries, every edge group by the RMS of
its values in each layer (no shift, so zero weights stay zero). Edits are made in normalised
units and mapped back by the same per-layer scale, so an edit of size ``rho`` means the same
relative change in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.utils import scatter

EPS = 1e-6


@dataclass
class NodeStats:
    """Per-node mean and scale (already gathered from per-layer statistics), ``[N, F]`` each."""

    mean: Tensor
    scale: Tensor


def node_stats(x: Tensor, mask: Tensor, layer: Tensor) -> NodeStats:
    """Mean and standard deviation of every (layer, slot) over its real entries, broadcast to nodes."""
    m = mask.to(x.dtype)
    n_layers = int(layer.max()) + 1 if layer.numel() else 1
    cnt = scatter(m, layer, 0, n_layers, "sum").clamp_min(1.0)
    mean = scatter(x * m, layer, 0, n_layers, "sum") / cnt
    var = scatter(((x - mean[layer]) ** 2) * m, layer, 0, n_layers, "sum") / cnt
    # a slot that is constant within a layer (e.g. all biases zero) is scaled by its magnitude or 1e-2
    std = var.sqrt()
    floor = torch.maximum(mean.abs() * 0.1, torch.full_like(mean, 1e-2))
    scale = torch.where(std > floor, std, floor)
    return NodeStats(mean[layer], scale[layer])


def edge_scale(attr: Tensor, layer: Tensor) -> Tensor:
    """RMS of the edge features of each layer, broadcast to edges: ``[E, 1]``."""
    if attr.numel() == 0:
        return attr.new_ones(attr.shape[0], 1)
    n_layers = int(layer.max()) + 1
    sq = scatter((attr**2).mean(1), layer, 0, n_layers, "mean")
    return (sq.sqrt() + EPS)[layer].unsqueeze(1)
