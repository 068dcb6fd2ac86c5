"""Fused message aggregation: same values and gradients as the PyG / segment_reduce reference path."""

from __future__ import annotations

import pytest
import torch

from metaprune.graph import to_graph
from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.fused import message_aggregate
from metaprune.metanet.model import BiMessageConv, Metanet
from metaprune.models import create_model

H = 5
# segment lengths into nodes 0..6: empty, single edge, several, empty, several, single, several
LENGTHS = [0, 1, 4, 0, 3, 1, 5]


def _graph(seed: int = 0, dtype: torch.dtype = torch.float64, ties: bool = False):
    """Target-sorted edges into ``LENGTHS`` segments; node 4's messages are all negative."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    n = len(LENGTHS)
    dst = torch.repeat_interleave(torch.arange(n), lengths)
    src = torch.randint(0, n, (len(dst),), generator=g)
    p, q = torch.randn(n, H, generator=g, dtype=dtype), torch.randn(n, H, generator=g, dtype=dtype)
    ce = torch.randn(len(dst), H, generator=g, dtype=dtype)
    ce[dst == 4] = -6.0  # SiLU < 0 everywhere: max is initial=0.0 and gets no gradient
    if ties:  # node 6: edges 2 and 4 duplicate edge 0 (same source, same ce), so tied max / min
        e6 = (dst == 6).nonzero().flatten()
        src[e6[[2, 4]]] = src[e6[0]].clone()
        ce[e6[[2, 4]]] = ce[e6[0]].clone()
    return p, q, ce, torch.stack([src, dst]), lengths


def _both(p, q, ce, index, lengths, grad_out=None):
    """(output, grads of p, q, ce) of the fused function and of the reference path."""
    res = []
    for fused in (True, False):
        pp, qq, cc = (t.detach().clone().requires_grad_() for t in (p, q, ce))
        out = BiMessageConv(H, fused=fused).partial(index, pp, qq, cc, lengths)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
        out.backward(g.to(out.dtype))
        res.append((out.detach(), pp.grad, qq.grad, cc.grad))
    return res


@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference_float64(ties):
    fused, ref = _both(*_graph(ties=ties))
    out = fused[0]
    assert torch.equal(out, ref[0])  # same ops in the same order: bitwise
    assert torch.equal(out[[0, 3]], torch.zeros(2, 4 * H, dtype=out.dtype))  # empty segments
    assert torch.equal(out[4, 2 * H : 3 * H], torch.zeros(H, dtype=out.dtype))  # negative-only max = 0
    assert (out[4, 3 * H :] < 0).all()
    for a, b in zip(fused[1:], ref[1:]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ties_follow_segment_reduce_backward():
    """Tied max / min: g / count to each when g > 0, the full g when g <= 0 (torch's kernel)."""
    p, q, ce, index, lengths = _graph(ties=True)
    e6 = (index[1] == 6).nonzero().flatten()[[0, 2, 4]]  # three identical messages into node 6
    a = p[index[0, e6]] + q[6] + ce[e6]
    m, s = torch.nn.functional.silu(a), torch.sigmoid(a)
    for sign in (1.0, -1.0):
        grad_out = torch.zeros(len(LENGTHS), 4 * H, dtype=torch.float64)
        grad_out[6, 2 * H :] = sign  # only max and min of node 6
        fused, ref = _both(p, q, ce, index, lengths, grad_out)
        assert torch.allclose(fused[3], ref[3], rtol=1e-12, atol=1e-14)
        mx, mn = fused[0][6, 2 * H : 3 * H], fused[0][6, 3 * H :]
        tied = (m[0] == mx).double() + (m[0] == mn).double()
        assert tied.sum() > 0
        share = sign / 3 if sign > 0 else sign
        expect = (share * tied * s[0] * (1 + a[0] * (1 - s[0]))).expand(3, H)
        assert torch.allclose(fused[3][e6], expect, rtol=1e-12, atol=1e-14)


def test_gradcheck_float64():
    p, q, ce, index, lengths = _graph(seed=3)
    args = tuple(t.clone().requires_grad_() for t in (p, q, ce))
    assert torch.autograd.gradcheck(lambda a, b, c: message_aggregate(a, b, c, index[0], index[1], lengths), args)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float16,) * 3,
                                    (torch.bfloat16, torch.bfloat16, torch.float32)])
def test_low_and_mixed_precision(dtypes):
    p, q, ce, index, lengths = _graph(seed=2)
    p, q, ce = (t.to(d) for t, d in zip((p, q, ce), dtypes))
    fused, ref = _both(p, q, ce, index, lengths)
    assert fused[0].dtype == ref[0].dtype == dtypes[-1]
    assert torch.equal(fused[0], ref[0])
    tol = 1e-5 if dtypes[0] == torch.float32 else 2e-2
    for a, b, t in zip(fused[1:], ref[1:], (p, q, ce)):
        assert a.dtype == t.dtype
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def test_no_edges():
    lengths = torch.zeros(3, dtype=torch.long)
    index = torch.zeros(2, 0, dtype=torch.long)
    fused, ref = _both(torch.randn(3, H), torch.randn(3, H), torch.randn(0, H), index, lengths)
    assert torch.equal(fused[0], torch.zeros(3, 4 * H)) and torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1], torch.zeros(3, H)) and torch.equal(fused[2], torch.zeros(3, H))


@pytest.mark.parametrize("kw", [{}, {"edge_chunk": 500, "checkpoint": True}])
def test_metanet_fused_matches_reference(kw):
    g = to_graph(create_model("cifar_resnet20", num_classes=10, in_chans=1))
    torch.manual_seed(0)
    ref = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=2, edit="residual", fused=False, **kw))
    fused = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=2, edit="residual", fused=True, **kw))
    fused.load_state_dict(ref.state_dict())
    outs, grads = [], []
    for net in (ref, fused):
        x, ea = net(g)
        (x.square().mean() + sum(v.square().mean() for v in ea.values())).backward()
        outs.append((x.detach(), {k: v.detach() for k, v in ea.items()}))
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert torch.equal(outs[0][0], outs[1][0])
    for k in outs[0][1]:
        assert torch.equal(outs[0][1][k], outs[1][1][k])
    for n, a in grads[0].items():
        b = grads[1][n]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item()), n


def test_old_config_defaults_to_fused():
    assert MetanetConfig.from_dict({"hidden": 8, "layers": 2}).fused is True
