"""Fused message computation and aggregation for :class:`metaprune.metanet.model.BiMessageConv`.

``message_aggregate`` computes the messages ``m = SiLU(p[src] + q[dst] + ce)`` of target-sorted
edges and their per-target sum, sum of squares, max and min in one autograd function. No
edge-sized tensor is saved for backward beyond the input ``ce``: the messages are recomputed
there. One forward + backward allocates 6 edge-sized ``[E, h]`` buffers (2 + 4, reused in place)
where PyG's ``propagate`` path allocates 13 and keeps 2 of them alive until backward.

Forward values match the ``propagate`` path bitwise in the tests (same operations in the same
order; CPU, float64 / float32 / bfloat16); gradients agree up to float rounding. Max / min ties
follow ``torch.segment_reduce``'s own backward exactly (it is called for them): see
:func:`message_aggregate`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _pre_activation(p: Tensor, q: Tensor, ce: Tensor, src: Tensor, dst: Tensor, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
    """``(p[src] + q[dst]) + ce`` in ``dtype``, and the (now spare) edge-sized buffer of ``q[dst]``.

    Rounded like the reference: ``p[src] + q[dst]`` in the dtype of ``p`` and ``q``, then
    promoted (a bf16 sum plus a float32 ``ce`` under autocast gives the same float32 values).
    """
    pq = torch.promote_types(p.dtype, q.dtype)
    a = p.to(pq).index_select(0, src)
    spare = q.to(pq).index_select(0, dst)
    a += spare
    a = a.to(dtype)
    a += ce
    return a, spare


def _reduce(x: Tensor, dst: Tensor, lengths: Tensor, reduce: str) -> Tensor:
    """Per-target ``"sum"``, ``"max"`` or ``"min"`` of target-sorted rows ``x``: ``[N, h]``.

    Max and min include 0 (``torch.segment_reduce``'s ``initial=0.0``), so empty segments give 0.
    On CPU ``index_add_`` / ``scatter_reduce_`` (same values, several times faster there than
    ``segment_reduce`` in torch 2.x); elsewhere, and for half-precision sums (which
    ``segment_reduce`` accumulates in float32 but ``index_add_`` would round at every step),
    ``segment_reduce`` itself (deterministic sums).
    """
    if x.device.type != "cpu" or (reduce == "sum" and x.dtype.itemsize < 4):
        return torch.segment_reduce(x, reduce, lengths=lengths, unsafe=True,
                                    initial=None if reduce == "sum" else 0.0)
    out = x.new_zeros(lengths.shape[0], x.shape[1])
    if reduce == "sum":
        return out.index_add_(0, dst, x)
    return out.scatter_reduce_(0, dst.unsqueeze(1).expand_as(x), x, "amax" if reduce == "max" else "amin")


class MessageAggregate(torch.autograd.Function):
    """Autograd function behind :func:`message_aggregate` (messages recomputed in backward)."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, q: Tensor, ce: Tensor, src: Tensor, dst: Tensor, lengths: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), ce.dtype)
        m = F.silu(_pre_activation(p, q, ce, src, dst, dtype)[0], inplace=True)
        s, mx, mn = (_reduce(m, dst, lengths, r) for r in ("sum", "max", "min"))
        s2 = _reduce(m.square_(), dst, lengths, "sum")
        del m
        out = torch.cat([s, s2, mx, mn], dim=1)
        ctx.save_for_backward(p, q, ce, src, dst, lengths, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        p, q, ce, src, dst, lengths, out = ctx.saved_tensors
        h = p.shape[1]
        g_sum, g_sq, g_max, g_min = grad.split(h, dim=1)
        mx, mn = out[:, 2 * h : 3 * h], out[:, 3 * h :]
        a, spare = _pre_activation(p, q, ce, src, dst, out.dtype)
        d = torch.sigmoid(a, out=spare) if spare.dtype == a.dtype else torch.sigmoid(a)
        del spare
        m = F.silu(a, inplace=True)  # bitwise the forward's messages (the ties below depend on it)
        del a
        d.addcmul_(d, m, value=-1.0).add_(m)  # SiLU'(a) = s (1 + a (1 - s)) = m + s (1 - m)
        # dL/dm: max / min through torch.segment_reduce's own backward (same tie handling), then
        # the sums' terms gathered into the min's buffer (4 edge-sized buffers in all)
        gm = torch.ops.aten._segment_reduce_backward(g_max, mx, m, "max", lengths=lengths, initial=0.0)
        t = torch.ops.aten._segment_reduce_backward(g_min, mn, m, "min", lengths=lengths, initial=0.0)
        gm += t
        gm += torch.index_select(g_sum, 0, dst, out=t)
        gm += torch.index_select(2.0 * g_sq, 0, dst, out=t).mul_(m)  # d(m^2)/dm as autograd's m * m gives it
        del t, m
        ga = gm.mul_(d)
        del d
        need_p, need_q, need_ce = ctx.needs_input_grad[:3]
        gp = ga.new_zeros(p.shape).index_add_(0, src, ga).to(p.dtype) if need_p else None
        gq = _reduce(ga, dst, lengths, "sum").to(q.dtype) if need_q else None
        return gp, gq, ga.to(ce.dtype) if need_ce else None, None, None, None


def message_aggregate(p: Tensor, q: Tensor, ce: Tensor, src: Tensor, dst: Tensor, lengths: Tensor) -> Tensor:
    """Per-target sum, sum of squares, max and min of ``SiLU(p[src] + q[dst] + ce)``: ``[N, 4h]``.

    Args:
        p, q: node tensors ``[N, h]`` (source and target projections).
        ce: edge tensor ``[E, h]``.
        src, dst: edge endpoints ``[E]``; edges must be sorted by ``dst`` (non-decreasing).
        lengths: number of edges into every node ``[N]`` (``bincount(dst, minlength=N)``).

    Same values and gradients as the ``torch.segment_reduce`` reductions of
    :class:`metaprune.metanet.model.BiMessageConv` (PyG path): max and min start from
    ``initial=0.0``, so a segment of negative messages has max 0 and passes no gradient through
    that max (a message exactly 0 does get it); empty segments give 0. Ties use
    ``torch.segment_reduce``'s backward itself, which on CPU and CUDA gives each tied element
    ``g / count`` when ``g > 0`` but the full ``g`` when ``g <= 0`` (a quirk of that kernel, kept so
    both paths train identically). Computed in the promoted dtype of ``p``, ``q``, ``ce`` (with
    ``p[src] + q[dst]`` rounded in theirs first, as the reference does); no edge-sized tensor is
    saved for backward (the messages are recomputed there). Pure torch ops: CPU and CUDA, and
    ``torch.utils.checkpoint`` (everything is saved through ``save_for_backward``).
    """
    return MessageAggregate.apply(p, q, ce, src, dst, lengths)
