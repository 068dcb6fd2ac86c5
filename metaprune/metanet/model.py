"""The metanetwork: a bidirectional message-passing GNN (PyTorch Geometric) that edits a graph.

Reads a :class:`metaprune.graph.Graph` (one node per channel, one edge per kernel slice) and
returns edited node and edge features::

    x'   = x   + mask * rho * dec_node(h)   * scale_node      (per layer, per slot)
    e'_g = e_g +        rho * dec_g(h_e)    * scale_g          (per layer, per edge group g)

Only real node slots (``x_mask``) change and frozen groups (identity shortcuts) are kept.
Each layer passes messages along the edges (input -> output channel) and against them, with
separate node projections per direction and a shared edge projection; the messages are
aggregated by mean, std, max and min. Node states carry role and relative-depth embeddings,
edge states carry role embeddings; every edge group has its own encoder and decoder.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import MessagePassing

from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.fused import message_aggregate
from metaprune.metanet.memory import release_in_backward, release_memory
from metaprune.metanet.normalize import edge_scale, node_stats

AGGREGATORS = ("mean", "std", "max", "min")


class BiMessageConv(MessagePassing):
    """One direction of message passing: ``m_ij = SiLU(P h_j + Q h_i + C e_ij)``, aggregated by
    mean / std / max / min.

    Edges must be sorted by target (:func:`sort_by_target`), so the aggregations run as segment
    reductions (several times faster than scatter max/min on CPU). The partial aggregates (sum,
    sum of squares, max, min) combine exactly, so edges can also be processed in chunks.
    With ``fused`` they are computed by :func:`metaprune.metanet.fused.message_aggregate`
    (messages recomputed in backward, not stored); otherwise by PyG's ``propagate`` (reference).
    """

    def __init__(self, hidden: int, fused: bool = True):
        super().__init__(aggr=None, flow="source_to_target", node_dim=0)
        self.hidden = hidden
        self.fused = fused

    def message(self, p_j: Tensor, q_i: Tensor, ce: Tensor) -> Tensor:  # noqa: D102
        return F.silu(p_j + q_i + ce)

    def aggregate(self, inputs: Tensor, index: Tensor, lengths: Tensor) -> Tensor:  # noqa: D102
        s = torch.segment_reduce(inputs, "sum", lengths=lengths, unsafe=True)
        s2 = torch.segment_reduce(inputs * inputs, "sum", lengths=lengths, unsafe=True)
        mx = torch.segment_reduce(inputs, "max", lengths=lengths, unsafe=True, initial=0.0)
        mn = torch.segment_reduce(inputs, "min", lengths=lengths, unsafe=True, initial=0.0)
        return torch.cat([s, s2, mx, mn], dim=1)

    def partial(self, edge_index: Tensor, p: Tensor, q: Tensor, ce: Tensor, lengths: Tensor) -> Tensor:
        """Sum, sum of squares, max and min of the messages into every node: ``[N, 4h]``."""
        if self.fused:
            return message_aggregate(p, q, ce, edge_index[0], edge_index[1], lengths)
        n = p.shape[0]
        return self.propagate(edge_index, p=p, q=q, ce=ce, lengths=lengths, size=(n, n))

    def forward(self, edge_index: Tensor, p: Tensor, q: Tensor, ce: Tensor, deg: Tensor) -> Tensor:
        """Mean, std, max, min of the messages into every node: ``[N, 4h]`` (edges sorted by target)."""
        return self.combine([self.partial(edge_index, p, q, ce, deg)], [deg > 0], deg, p.dtype)

    def combine(self, parts: list[Tensor], present: list[Tensor], deg: Tensor, dtype: torch.dtype) -> Tensor:
        """Exact mean / std / max / min from the partial aggregates of several edge chunks."""
        h = self.hidden
        s = sum(pp[:, :h] for pp in parts)
        s2 = sum(pp[:, h : 2 * h] for pp in parts)
        if len(parts) == 1:
            mx, mn = parts[0][:, 2 * h : 3 * h], parts[0][:, 3 * h :]
        else:
            big = torch.finfo(dtype).max
            mx = mn = None
            for pp, pr in zip(parts, present):
                m = pr.unsqueeze(1)
                cmx = torch.where(m, pp[:, 2 * h : 3 * h], -big)
                cmn = torch.where(m, pp[:, 3 * h :], big)
                mx = cmx if mx is None else torch.maximum(mx, cmx)
                mn = cmn if mn is None else torch.minimum(mn, cmn)
            has = (deg > 0).unsqueeze(1)
            mx, mn = torch.where(has, mx, 0.0), torch.where(has, mn, 0.0)
        d = deg.clamp_min(1).to(dtype).unsqueeze(1)
        mean = s / d
        std = (s2 / d - mean * mean).clamp_min(0.0).add(1e-5).sqrt()
        return torch.cat([mean, std, mx, mn], dim=1)


def sort_by_target(edge_index: Tensor) -> Tensor:
    """Permutation that sorts edges by target node (row 1), stable."""
    return torch.sort(edge_index[1], stable=True).indices


@dataclass
class EdgePlan:
    """Edge order and chunks shared by all layers of one forward pass.

    Edges are kept sorted by target (``index``), so every chunk is a contiguous slice of the edge
    states (a view, no copy) and its forward messages are already grouped by target. For the
    backward direction each chunk is re-sorted *locally* by source (``bwd_perm``), so no
    full-size gather of the edge states (and no full-size gradient per chunk) is ever made.
    ``fwd_len`` / ``bwd_len`` are each chunk's segment lengths over all ``N`` nodes.
    """

    index: Tensor
    deg_in: Tensor
    deg_out: Tensor
    sizes: list[int]
    fwd_idx: list[Tensor]
    fwd_len: list[Tensor]
    bwd_perm: list[Tensor]
    bwd_idx: list[Tensor]
    bwd_len: list[Tensor]

    @classmethod
    def build(cls, index: Tensor, n: int, chunk: int | None) -> EdgePlan:
        E = index.shape[1]
        step = max(1, E if chunk is None else min(chunk, E))
        fwd_idx = list(index.split(step, 1)) if E else [index]
        bwd_perm = [sort_by_target(i.flip(0)) for i in fwd_idx]
        bwd_idx = [i.flip(0)[:, p] for i, p in zip(fwd_idx, bwd_perm)]
        return cls(index, torch.bincount(index[1], minlength=n), torch.bincount(index[0], minlength=n),
                   [i.shape[1] for i in fwd_idx], fwd_idx, [torch.bincount(i[1], minlength=n) for i in fwd_idx],
                   bwd_perm, bwd_idx, [torch.bincount(i[1], minlength=n) for i in bwd_idx])


class MetanetLayer(nn.Module):
    """A bidirectional layer: node update from both message directions, edge update from both endpoints."""

    def __init__(self, hidden: int, fused: bool = True):
        super().__init__()
        h = hidden
        self.norm_h = nn.LayerNorm(h)
        self.norm_e = nn.LayerNorm(h)
        self.node_proj = nn.Linear(h, 6 * h)  # P_fwd, Q_fwd, P_bwd, Q_bwd, U (edge src), V (edge dst)
        self.edge_proj = nn.Linear(h, 2 * h)  # C (messages), W (edge update)
        self.dir_bias = nn.Parameter(torch.zeros(2, h))
        self.conv = BiMessageConv(h, fused)
        self.node_mlp = nn.Sequential(nn.Linear(9 * h, h), nn.SiLU(), nn.Linear(h, h))
        self.edge_out = nn.Linear(h, h)

    def forward(self, h: Tensor, e: Tensor, plan: EdgePlan, recompute: bool, edges: bool = True
                ) -> tuple[Tensor, Tensor]:
        """Update node states ``h [N, h]`` and edge states ``e [E, h]`` (edges in ``plan``'s order).

        Edges are processed chunk by chunk (``plan``); with ``recompute`` every chunk is recomputed
        in the backward pass, so only ``e`` itself and node-sized tensors are kept for it. With
        ``edges=False`` the edge states are returned unchanged (nothing reads them afterwards).
        """
        hn = self.norm_h(h)
        node = self.node_proj(hn)
        outs = []
        for i, ev in enumerate(e.split(plan.sizes, 0)):  # views: no copy, one SplitBackward
            args = (ev, node, plan.fwd_idx[i], plan.fwd_len[i], plan.bwd_perm[i], plan.bwd_idx[i], plan.bwd_len[i],
                    edges)
            if recompute and torch.is_grad_enabled():
                outs.append(checkpoint(self._chunk, *args, use_reentrant=False))
            else:
                outs.append(self._chunk(*args))
        fwd = self.conv.combine([o[0] for o in outs], [ln > 0 for ln in plan.fwd_len], plan.deg_in, h.dtype)
        bwd = self.conv.combine([o[1] for o in outs], [ln > 0 for ln in plan.bwd_len], plan.deg_out, h.dtype)
        h = h + self.node_mlp(torch.cat([hn, fwd, bwd], dim=1))
        if not edges:
            return h, e
        de = torch.cat([o[2] for o in outs], 0) if len(outs) > 1 else outs[0][2]
        return h, e + de

    def _chunk(self, e: Tensor, node: Tensor, fidx: Tensor, flen: Tensor, bperm: Tensor, bidx: Tensor,
               blen: Tensor, edges: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Forward and backward partial aggregates and (with ``edges``) the edge update of one chunk."""
        pf, qf, pb, qb, u, v = node.chunk(6, dim=1)
        ce, we = self.edge_proj(self.norm_e(e)).chunk(2, dim=1)
        fwd = self.conv.partial(fidx, pf, qf, ce + self.dir_bias[0], flen)
        bwd = self.conv.partial(bidx, pb, qb, ce.index_select(0, bperm) + self.dir_bias[1], blen)
        if not edges:
            return fwd, bwd, None
        de = self.edge_out(F.silu(u[fidx[0]] + v[fidx[1]] + we))
        return fwd, bwd, de


_BAD_BN_CACHE: OrderedDict[str, frozenset[str] | None] = OrderedDict()
_BAD_BN_CACHE_SIZE = 16


def _bn_not_after_sole_conv(spec: dict) -> frozenset[str] | None:
    """Module paths of the BatchNorms of ``spec``'s architecture whose input is *not* the output of
    a conv / linear layer read by that BatchNorm alone (e.g. ``bn(x + f(x))`` in a pre-activation
    block, or ``bn(conv(x))`` where ``conv(x)`` also feeds a shortcut). ``None`` when the
    architecture cannot be built and traced here (not registered, e.g. a synthetic graph).

    The graph cannot tell these apart (a BatchNorm writes its slots into the channels it reads,
    and a shortcut reading ``conv(x)`` looks like one reading ``bn(conv(x))``), so the model's
    forward is traced once per architecture (on the meta device, torch.fx, the graph's leaf rules).
    """
    import json

    import torch.fx as fx

    from metaprune.graph.rules import find_rule
    from metaprune.models import create_model

    arch = spec.get("arch")
    if not isinstance(arch, str):
        return None
    key = json.dumps([arch, spec.get("arch_args", {})], sort_keys=True, default=str)
    if key in _BAD_BN_CACHE:
        _BAD_BN_CACHE.move_to_end(key)
        return _BAD_BN_CACHE[key]

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return find_rule(m) is not None or super().is_leaf_module(m, qualname)

    try:
        with torch.device("meta"):
            model = create_model(arch, **dict(spec.get("arch_args", {})))
        fxg = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - an architecture we cannot rebuild: the caller falls back
        bad = None
    else:
        mods = dict(model.named_modules())
        bad_set = set()
        for n in fxg.nodes:
            if n.op != "call_module" or not isinstance(mods.get(str(n.target)), nn.modules.batchnorm._BatchNorm):
                continue
            src = n.args[0] if n.args else None
            sole_conv = (isinstance(src, fx.Node) and src.op == "call_module"
                         and isinstance(mods.get(str(src.target)), (nn.Conv2d, nn.Linear)) and len(src.users) == 1)
            if not sole_conv:
                bad_set.add(str(n.target))
        bad = frozenset(bad_set)
    _BAD_BN_CACHE[key] = bad
    while len(_BAD_BN_CACHE) > _BAD_BN_CACHE_SIZE:
        _BAD_BN_CACHE.popitem(last=False)
    return bad


def scalable_channels(graph, frozen_groups=("id",)) -> Tensor:
    """Which channels the ``"scale"`` edit may rescale without changing the network's function: ``[N]`` bool.

    Scaling a channel multiplies its incoming weights and bias by ``s`` and its BatchNorm running
    statistics by ``s`` / ``s**2``; that leaves the function unchanged only if the BatchNorm reads
    exactly that channel's conv / linear output and nothing else reads it. So a channel qualifies
    when it has a BatchNorm, at least one incoming edge, no incoming edge of a frozen group
    (identity edges of residual sums, concats, stacked norms are never scaled) and -- where the
    architecture can be traced -- its BatchNorm's input is a conv / linear output used by that
    BatchNorm only. A BatchNorm that reads a residual sum (pre-activation blocks), the input, or a
    conv output that a shortcut also reads is skipped (``s = 1``). An architecture that cannot be
    rebuilt from the graph's spec (not registered) gets no scalable channel at all.
    """
    from metaprune.graph import NODE_SLOTS

    dev = graph.x_mask.device
    n = graph.x_mask.shape[0]
    ok = graph.x_mask[:, NODE_SLOTS.index("bn_weight")].clone()
    fed = torch.zeros(n, dtype=torch.bool, device=dev)
    frozen_in = torch.zeros(n, dtype=torch.bool, device=dev)
    for g, eg in graph.edges.items():
        if eg.index.shape[1] == 0:
            continue
        tgt = eg.index[1].to(dev)
        (frozen_in if g in frozen_groups else fed).index_fill_(0, tgt, True)
    ok &= fed & ~frozen_in
    return ok & _traced_keep(graph.spec or {}, n, dev)


_KEEP_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()


def _traced_keep(spec: dict, n: int, dev: torch.device) -> Tensor:
    """``[N]`` bool on ``dev``: False on the channels of the BatchNorms :func:`_bn_not_after_sole_conv`
    rejects, and everywhere when the architecture cannot be traced (with a warning). Cached per
    structure and device, so a meta-training step makes no host-to-device copy (no device sync)."""
    import json

    key = (json.dumps([spec.get("arch"), spec.get("arch_args", {}), spec.get("widths", {})], sort_keys=True,
                      default=str), n, str(dev))
    if key in _KEEP_CACHE:
        _KEEP_CACHE.move_to_end(key)
        return _KEEP_CACHE[key]
    bad = _bn_not_after_sole_conv(spec)
    if bad is None:  # nothing can be verified: the edit keeps every channel (the identity)
        warnings.warn(f"the scale edit cannot trace architecture {spec.get('arch')!r} (not registered), so it "
                      "cannot tell which BatchNorms read a conv output alone; it leaves this network unchanged",
                      stacklevel=3)
        keep = torch.zeros(n, dtype=torch.bool, device=dev)
    else:
        keep = torch.ones(n, dtype=torch.bool)
        for e in spec.get("layout", []):
            if e.get("kind") == "node" and str(e.get("key", "")).rsplit(".", 1)[0] in bad:
                keep[int(e["start"]):int(e["start"]) + int(e["count"])] = False
        keep = keep.to(dev)
    _KEEP_CACHE[key] = keep
    while len(_KEEP_CACHE) > 4 * _BAD_BN_CACHE_SIZE:
        _KEEP_CACHE.popitem(last=False)
    return keep


#: per-node magnitudes a score metanetwork reads besides the graph features (see :func:`score_features`)
SCORE_FEATURES = ("log_in_norm", "log_out_norm", "log_norm_affine", "log_functional")


def score_features(graph, frozen_groups=("id",)) -> Tensor:
    """Hand-made per-channel magnitudes for the ``"score"`` output, z-scored within each graph layer: ``[N, 4]``.

    Columns (:data:`SCORE_FEATURES`): ``log`` of the norm of a channel's incoming weights (its output row),
    of its outgoing weights (the next layers' input columns), of its normalisation's ``(gamma, beta)``
    (the incoming norm where it has none), and the sum of the last two (the ``functional`` criterion).
    Only their relative size inside a layer is kept (depth- and width-agnostic); a layer where a
    magnitude is missing or constant gets 0.
    """
    from metaprune.graph import NODE_SLOTS

    x = graph.x.float()
    n = x.shape[0]
    dev = x.device
    inn = torch.zeros(n, device=dev)
    out = torch.zeros(n, device=dev)
    for g, eg in graph.edges.items():
        if g in frozen_groups or eg.index.shape[1] == 0:
            continue
        sq = eg.attr.float().pow(2).sum(1)
        inn.index_add_(0, eg.index[1].to(dev), sq)
        out.index_add_(0, eg.index[0].to(dev), sq)
    inn, out = inn.sqrt(), out.sqrt()
    bw, bb = NODE_SLOTS.index("bn_weight"), NODE_SLOTS.index("bn_bias")
    lw, lb = NODE_SLOTS.index("ln_weight"), NODE_SLOTS.index("ln_bias")
    m = graph.x_mask
    aff = torch.where(m[:, bw], (x[:, bw] ** 2 + x[:, bb] ** 2).sqrt(),
                      torch.where(m[:, lw], (x[:, lw] ** 2 + x[:, lb] ** 2).sqrt(), inn))
    eps = 1e-8
    cols = [inn, out, aff]
    present = [c > eps for c in cols]
    logs = [torch.where(p, c.clamp_min(eps).log(), torch.zeros_like(c)) for c, p in zip(cols, present)]
    cols = logs + [logs[1] + logs[2]]
    present = present + [present[1] & present[2]]
    layer = graph.node_layer.long().to(dev)
    nl = int(layer.max()) + 1 if n else 1
    feats = []
    for c, p in zip(cols, present):
        pf = p.float()
        cnt = torch.zeros(nl, device=dev).index_add_(0, layer, pf).clamp_min(1)
        mean = torch.zeros(nl, device=dev).index_add_(0, layer, c * pf) / cnt
        var = torch.zeros(nl, device=dev).index_add_(0, layer, (c - mean[layer]) ** 2 * pf) / cnt
        feats.append(((c - mean[layer]) / var.sqrt().clamp_min(1e-3)[layer]) * pf)
    return torch.stack(feats, 1)


def _decoder(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))


class Metanet(nn.Module):
    """Graph metanetwork: encoders, ``cfg.layers`` bidirectional layers, residual decoders.

    ``forward(graph)`` returns ``(x', {group: attr'})``, differentiable in the metanetwork's
    parameters and in the graph's features.
    """

    def __init__(self, cfg: MetanetConfig):
        super().__init__()
        if cfg.node_dim < 1 or not cfg.edge_dims:
            raise ValueError("MetanetConfig.node_dim and edge_dims must be set (use Metanet.for_graph)")
        self.cfg = cfg
        h = cfg.hidden
        score = cfg.output == "score"
        self.node_enc = nn.Linear(2 * cfg.node_dim + 2 * cfg.depth_freqs + 1 + (len(SCORE_FEATURES) if score else 0), h)
        self.node_role = nn.Embedding(cfg.node_roles, h)
        self.edge_role = nn.Embedding(cfg.edge_roles, h)
        self.edge_enc = nn.ModuleDict({g: nn.Linear(d, h) for g, d in sorted(cfg.edge_dims.items())})
        self.layers = nn.ModuleList(MetanetLayer(h, cfg.fused) for _ in range(cfg.layers))
        if score:  # node score = prior[:3] . score_features[:, :3] + decoder(h); a group channel's score adds
            # prior[3] x its standardised log functional score (metanet.rank.group_scores): starts as `functional`
            self.score_dec = _decoder(h, 1)
            nn.init.zeros_(self.score_dec[-1].weight)
            nn.init.zeros_(self.score_dec[-1].bias)
            self.score_prior = nn.Parameter(torch.tensor([0.0] * (len(SCORE_FEATURES) - 1) + [1.0]))
        elif cfg.edit == "scale":
            self.scale_dec = _decoder(h, 1)
            nn.init.zeros_(self.scale_dec[-1].weight)  # starts at s = 1 (the identity)
            nn.init.zeros_(self.scale_dec[-1].bias)
        else:
            self.node_dec = _decoder(h, cfg.node_dim)
            self.edge_dec = nn.ModuleDict({g: _decoder(h, d) for g, d in sorted(cfg.edge_dims.items())
                                           if g not in cfg.frozen_groups})

    @classmethod
    def for_graph(cls, graph, cfg: MetanetConfig | None = None) -> Metanet:
        """A metanetwork sized for ``graph``'s node and edge feature dimensions."""
        cfg = cfg or MetanetConfig()
        cfg.node_dim = int(graph.x.shape[1])
        cfg.edge_dims = {g: int(eg.attr.shape[1]) for g, eg in graph.edges.items()}
        return cls(cfg)

    def _depth_features(self, depth: Tensor) -> Tensor:
        rel = depth.to(torch.float32) / depth.max().clamp_min(1).to(torch.float32)
        k = torch.arange(self.cfg.depth_freqs, device=depth.device, dtype=torch.float32)
        ang = rel.unsqueeze(1) * math.pi * (2.0**k).unsqueeze(0)
        return torch.cat([rel.unsqueeze(1), ang.sin(), ang.cos()], dim=1)

    def slot_mask(self, x: Tensor) -> Tensor:
        """1 for node slots the metanetwork may edit, 0 for ``cfg.frozen_slots``: ``[1, F]``."""
        from metaprune.graph import NODE_SLOTS

        keep = torch.ones(1, x.shape[1], dtype=x.dtype, device=x.device)
        for name in self.cfg.frozen_slots:
            if name in NODE_SLOTS and NODE_SLOTS.index(name) < x.shape[1]:
                keep[0, NODE_SLOTS.index(name)] = 0.0
        return keep

    def check_graph(self, graph) -> None:
        """Raise if ``graph`` has feature sizes this metanetwork was not built for."""
        from metaprune.errors import ConfigError

        if graph.x.shape[1] != self.cfg.node_dim:
            raise ConfigError(f"the graph has {graph.x.shape[1]}-dim node features but this metanetwork reads "
                              f"{self.cfg.node_dim}; it was trained on another architecture family")
        for g, eg in graph.edges.items():
            if eg.attr.shape[0] and self.cfg.edge_dims.get(g) != eg.attr.shape[1]:
                raise ConfigError(f"edge group {g!r} ({eg.attr.shape[1]} features) is unknown to this metanetwork "
                                  f"(it knows {self.cfg.edge_dims}); it was trained on another architecture family")

    def forward(self, graph, x: Tensor | None = None, edge_attr: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
        """Edited ``(x, {group: attr})`` of ``graph`` (features may be overridden by ``x`` / ``edge_attr``);
        with ``cfg.output == "score"`` one importance score per node, ``[N]`` (float32)."""
        cfg = self.cfg
        self.check_graph(graph)
        score = cfg.output == "score"
        x = graph.x if x is None else x
        attrs = {g: (eg.attr if edge_attr is None or g not in edge_attr else edge_attr[g])
                 for g, eg in graph.edges.items()}
        mask = graph.x_mask.to(x.dtype)
        st = node_stats(x, graph.x_mask, graph.node_layer)
        xn = (x - st.mean) / st.scale * mask
        parts = [xn, mask, self._depth_features(graph.node_depth)]
        if score:
            sf = score_features(graph, cfg.frozen_groups)
            parts.append(sf.to(x.dtype))
        feats = torch.cat(parts, dim=1)
        h = self.node_enc(feats) + self.node_role(graph.node_role.clamp_max(cfg.node_roles - 1))
        groups = [g for g in sorted(graph.edges) if graph.edges[g].index.shape[1] > 0]
        scales, e_parts, idx_parts, sizes = {}, [], [], []
        for g in groups:
            eg = graph.edges[g]
            scales[g] = edge_scale(attrs[g], eg.layer)
            e_parts.append(self.edge_enc[g](attrs[g] / scales[g])
                           + self.edge_role(eg.role.clamp_max(cfg.edge_roles - 1)))
            idx_parts.append(eg.index)
            sizes.append(eg.index.shape[1])
        e = torch.cat(e_parts, 0)
        edge_index = torch.cat(idx_parts, 1)
        # all layers keep the edges sorted by target (segment reductions, contiguous chunks)
        perm = sort_by_target(edge_index)
        plan = EdgePlan.build(edge_index[:, perm], x.shape[0], cfg.edge_chunk)
        e = e.index_select(0, perm)
        chunked = cfg.edge_chunk is not None
        for i, layer in enumerate(self.layers):
            # the scale edit and the scores read nodes only
            edges = (cfg.edit != "scale" and not score) or i < len(self.layers) - 1
            if cfg.checkpoint and torch.is_grad_enabled():  # per layer (nested with per-chunk recompute)
                h, e = checkpoint(layer, h, e, plan, chunked, edges, use_reentrant=False)
            else:
                h, e = layer(h, e, plan, chunked, edges)
            if chunked or cfg.checkpoint:  # keep RSS near what is live (see metanet.memory)
                release_memory()
                e = release_in_backward(e)
        if score:  # the last prior coefficient weights the group-level functional score (metanet.rank.group_scores)
            return sf[:, :-1].float() @ self.score_prior[:-1].float() + self.score_dec(h).squeeze(1).float()
        if cfg.edit == "scale":
            return self._scale_edit(graph, x, attrs, h)
        x_out = x + mask * self.slot_mask(x) * cfg.rho * self.node_dec(h) * st.scale
        e = e.index_select(0, torch.argsort(perm))
        out = {}
        for g, eh in zip(groups, e.split(sizes, 0)):
            if g in cfg.frozen_groups or g not in self.edge_dec:
                out[g] = attrs[g]
                continue
            if chunked:
                dec = torch.cat([checkpoint(self.edge_dec[g], c, use_reentrant=False) if torch.is_grad_enabled()
                                 else self.edge_dec[g](c) for c in eh.split(cfg.edge_chunk, 0)], 0)
            else:
                dec = self.edge_dec[g](eh)
            out[g] = attrs[g] + cfg.rho * dec * scales[g]
        for g in graph.edges:
            out.setdefault(g, attrs[g])
        return x_out, out

    def channel_scales(self, graph, h: Tensor) -> Tensor:
        """Per node, the factor ``s`` of the ``"scale"`` edit (1 where it would not preserve the
        function, see :func:`scalable_channels`): ``[N]``.

        ``log s`` is centred within every layer (geometric mean 1), so the edit can only move
        channels against each other, not rescale a whole layer.
        """
        ok = scalable_channels(graph, self.cfg.frozen_groups).float()
        log_s = self.cfg.rho * torch.tanh(self.scale_dec(h).squeeze(1).float()) * ok
        # centre per layer: a layer-wide factor would only reweight whole layers in the pruner's
        # ranking (the same for every network); what is left must single out channels
        layer = graph.node_layer.long()
        n = layer.shape[0]  # an upper bound on the layer ids (no device sync)
        mean = log_s.new_zeros(n).index_add(0, layer, log_s) / ok.new_zeros(n).index_add(0, layer, ok).clamp_min(1)
        return ((log_s - mean.index_select(0, layer)) * ok).exp()

    def _scale_edit(self, graph, x: Tensor, attrs: dict[str, Tensor], h: Tensor
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Multiply the incoming weights (and bias) of every BN-normalised channel by its scale ``s``,
        its BN running mean by ``s`` and running variance by ``s**2``: the same function in eval
        mode too (up to BN's eps), with or without re-estimated statistics. Only channels where
        this holds are scaled (:func:`scalable_channels`); every other channel keeps ``s = 1``."""
        from metaprune.graph import NODE_SLOTS

        s = self.channel_scales(graph, h)
        cols = [NODE_SLOTS.index(n) for n in ("bias", "bn_mean", "bn_var")]
        fac = torch.stack([s, s, s * s], 1).to(x.dtype)
        real = graph.x_mask[:, cols]
        x = x.clone()
        x[:, cols] = torch.where(real, x[:, cols] * fac, x[:, cols])
        out = {}
        for g, eg in graph.edges.items():
            if g in self.cfg.frozen_groups or eg.index.shape[1] == 0:
                out[g] = attrs[g]
            else:
                out[g] = attrs[g] * s.index_select(0, eg.index[1]).unsqueeze(1).to(attrs[g].dtype)
        return x, out
