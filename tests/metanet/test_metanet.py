"""Metanetwork: shapes, near-identity start, masking, equivariance, chunking, loss, checkpoint, transform."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metaprune.graph import EdgeGroup, Graph, graph_params, to_graph
from metaprune.metanet.checkpoint import load_metanet, save_metanet
from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.loss import dependency_groups, group_sparsity
from metaprune.metanet.model import Metanet
from metaprune.metanet.transform import edit_params, transform_model
from metaprune.models import create_model


def _model(seed: int = 0, depth: int = 20):
    torch.manual_seed(seed)
    m = create_model(f"cifar_resnet{depth}", num_classes=4, in_chans=1)
    for mod in m.modules():  # non-trivial BN so normalisation has something to do
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
            mod.running_var.data.uniform_(0.5, 2.0)
    return m.eval()


def _net(g, **kw):
    torch.manual_seed(0)
    return Metanet.for_graph(g, MetanetConfig(**{"hidden": 8, "layers": 2, "edit": "residual", **kw}))


def test_edit_is_small_masked_and_keeps_frozen_parts():
    g = to_graph(_model())
    net = _net(g)
    x, ea = net(g)
    assert x.shape == g.x.shape and set(ea) == set(g.edges)
    # padding slots and BN running statistics are never edited
    assert torch.equal(x[~g.x_mask], g.x[~g.x_mask])
    assert torch.equal(x[:, 2:4], g.x[:, 2:4])
    assert not torch.equal(x[:, 0], g.x[:, 0])
    assert torch.equal(ea["id"], g.edges["id"].attr)
    # residual edit: relative change of a conv layer is O(rho), not O(1)
    rel = (ea["k9"] - g.edges["k9"].attr).norm() / g.edges["k9"].attr.norm()
    assert 0 < rel < 0.5


def test_channel_permutation_equivariance():
    """Permuting the channels of one layer permutes the edit the same way (no positional leakage)."""
    g = to_graph(_model())
    net = _net(g).eval()
    layer = int(g.node_layer[g.node_role == 1][0])
    nodes = (g.node_layer == layer).nonzero().flatten()
    perm = torch.arange(g.num_nodes)
    perm[nodes] = nodes[torch.randperm(len(nodes), generator=torch.Generator().manual_seed(1))]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    edges = {k: EdgeGroup(inv[e.index], e.attr, e.role, e.layer) for k, e in g.edges.items()}
    gp = Graph(g.x[perm], g.x_mask[perm], g.node_role[perm], g.node_layer[perm], g.node_depth[perm], edges, g.spec)
    with torch.no_grad():
        x0, e0 = net(g)
        x1, e1 = net(gp)
    assert torch.allclose(x1, x0[perm], atol=1e-5)
    for k in e0:
        assert torch.allclose(e1[k], e0[k], atol=1e-5)


@pytest.mark.parametrize("chunk,ckpt", [(9000, True), (7000, False), (None, True)])
def test_chunked_and_checkpointed_match_plain(chunk, ckpt):
    g = to_graph(_model())
    torch.manual_seed(0)
    plain = _net(g)
    chunked = _net(g, edge_chunk=chunk, checkpoint=ckpt)
    chunked.load_state_dict(plain.state_dict())
    x0, e0 = plain(g)
    x1, e1 = chunked(g)
    assert torch.allclose(x0, x1, atol=1e-5)
    assert torch.allclose(e0["k9"], e1["k9"], atol=1e-5)
    (x1.sum() + e1["k9"].sum()).backward()
    (x0.sum() + e0["k9"].sum()).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters()):
        if a.grad is None:  # parts that do not reach the summed outputs
            assert b.grad is None, n
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), n


def test_loss_gradients_reach_metanet_and_sparsity_is_explicit():
    m = _model()
    g = to_graph(m)
    net = _net(g)
    groups = dependency_groups(m, (1, 32, 32))
    assert len(groups) > 0 and all(g_.size > 0 for g_ in groups)
    buffers = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    params = edit_params(net, g, buffers)
    x = torch.randn(4, 1, 32, 32)
    m.train()
    ce = torch.nn.functional.cross_entropy(functional_call(m, params, (x,)), torch.tensor([0, 1, 2, 3]))
    sp = group_sparsity(params, groups)
    (ce + sp).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    # zeroing a whole group's channel removes exactly its contribution
    p0 = {k: v.detach().clone() for k, v in graph_params(g).items()}
    base = group_sparsity(p0, groups[:1], alpha=1.0)
    for s in groups[0].slices:
        w = p0[s.key].movedim(s.dim, 0)
        w[s.idxs[s.root == 0]] = 0
    assert group_sparsity(p0, groups[:1], alpha=1.0) < base


def test_checkpoint_roundtrip_and_transform(tmp_path):
    m = _model()
    g = to_graph(m)
    net = _net(g)
    save_metanet(net, tmp_path / "mn", extra={"note": "t"})
    net2, meta = load_metanet(tmp_path / "mn")
    assert meta["note"] == "t" and not list((tmp_path / "mn").glob("*.pt"))
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    edited = transform_model(net2, m)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y0, y1 = m(x), edited(x)
    assert y1.shape == y0.shape and not torch.equal(y0, y1)
    assert torch.isfinite(y1).all()


def test_transfer_to_deeper_resnet_runs():
    """A metanetwork built on ResNet-20 graphs reads ResNet-32 graphs (same feature kinds)."""
    net = _net(to_graph(_model()))
    g32 = to_graph(_model(depth=32))
    x, ea = net(g32)
    assert x.shape == g32.x.shape
