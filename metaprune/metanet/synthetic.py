"""Random graphs with the shape of a CIFAR ResNet's channel graph (benchmarks and unit tests).

They follow the :class:`metaprune.graph.Graph` contract (``x``, ``x_mask``, roles, layers, depths,
edge groups ``k9`` / ``k1`` / ``id``) but are not converted from a network; use
:func:`metaprune.graph.to_graph` for real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SynthEdges:
    """An edge group: ``index[2, E]`` (row 0 input channel, row 1 output channel), ``attr``, ``role``, ``layer``."""

    index: Tensor
    attr: Tensor
    role: Tensor
    layer: Tensor


@dataclass
class SynthGraph:
    """A graph-shaped bundle of tensors (see module doc)."""

    x: Tensor
    x_mask: Tensor
    node_role: Tensor
    node_layer: Tensor
    node_depth: Tensor
    edges: dict[str, SynthEdges]
    spec: dict = field(default_factory=dict)

    @property
    def num_edges(self) -> int:
        return sum(int(e.index.shape[1]) for e in self.edges.values())


def resnet_like_graph(depth: int = 56, in_chans: int = 3, num_classes: int = 10, widths=(16, 32, 64),
                      node_dim: int = 8, seed: int = 0) -> SynthGraph:
    """A random graph shaped like CIFAR ResNet-``depth``: dense 3x3 conv blocks, sparse identity
    shortcuts, 1x1 downsampling shortcuts and a linear classifier."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = (depth - 2) // 6
    layer_sizes: list[int] = [in_chans]
    groups: dict[str, list] = {"k9": [], "k1": [], "id": []}
    offsets = [0]

    def add_layer(width: int) -> int:
        offsets.append(offsets[-1] + layer_sizes[-1])
        layer_sizes.append(width)
        return len(layer_sizes) - 1

    def nodes(layer: int) -> Tensor:
        return torch.arange(layer_sizes[layer]) + offsets[layer]

    def dense(src: int, dst: int, group: str, dim: int, lid: int) -> None:
        s, d = nodes(src), nodes(dst)
        idx = torch.stack([s.repeat_interleave(len(d)), d.repeat(len(s))])
        attr = torch.randn(idx.shape[1], dim, generator=g) * (2.0 / (len(s) * dim)) ** 0.5
        groups[group].append((idx, attr, 0 if group == "k9" else 1, lid))

    cur = 0
    stem = add_layer(widths[0])
    dense(cur, stem, "k9", 9, stem)
    cur = stem
    for si, w in enumerate(widths):
        for b in range(n_blocks):
            a = add_layer(w)
            dense(cur, a, "k9", 9, a)
            c = add_layer(w)
            dense(a, c, "k9", 9, c)
            if layer_sizes[cur] != w or (si > 0 and b == 0):
                dense(cur, c, "k1", 1, c)
            else:
                idx = torch.stack([nodes(cur), nodes(c)])
                groups["id"].append((idx, torch.ones(idx.shape[1], 1), 2, c))
            cur = c
    fc = add_layer(num_classes)
    dense(cur, fc, "k1", 1, fc)
    n = offsets[-1] + layer_sizes[-1]
    node_layer = torch.cat([torch.full((s,), i) for i, s in enumerate(layer_sizes)])
    x = torch.randn(n, node_dim, generator=g) * 0.1
    x[:, 0] += 1.0
    x[:, 3] = x[:, 3].abs() + 0.5
    mask = torch.zeros(n, node_dim, dtype=torch.bool)
    mask[:, :4] = True
    mask[: layer_sizes[0]] = False
    role = torch.ones(n, dtype=torch.long)
    role[: layer_sizes[0]] = 0
    role[-num_classes:] = 2
    edges = {}
    for name, parts in groups.items():
        if parts:
            edges[name] = SynthEdges(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0),
                                     torch.cat([torch.full((p[0].shape[1],), p[2]) for p in parts]),
                                     torch.cat([torch.full((p[0].shape[1],), p[3]) for p in parts]))
    return SynthGraph(x, mask, role, node_layer, node_layer.clone(), edges, {"arch": f"synthetic_resnet{depth}"})
