"""Equivariance, unsupported layers, differentiability, files and PyG export."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from graph_helpers import assert_same_model, input_for, small_model

from metaprune.errors import GraphError, ModelFileError
from metaprune.graph import NODE_ROLES, NODE_SLOTS, Graph, from_graph, graph_params, to_graph


def _layer_nodes(g: Graph, name: str) -> torch.Tensor:
    lid = next(lay["id"] for lay in g.spec["layers"] if lay["name"] == name)
    return torch.nonzero(g.node_layer == lid).flatten()


def _assert_permuted(g1: Graph, g2: Graph, new_id: torch.Tensor) -> None:
    """g2 is g1 with node n renamed new_id[n] (features, roles, and every edge group as a set)."""
    inv = torch.empty_like(new_id)
    inv[new_id] = torch.arange(len(new_id))
    assert torch.equal(g2.x[new_id], g1.x)
    assert torch.equal(g2.node_role[new_id], g1.node_role)
    assert torch.equal(g2.node_layer[new_id], g1.node_layer)
    assert torch.equal(g2.node_depth[new_id], g1.node_depth)
    n = g1.num_nodes
    for k, e1 in g1.edges.items():
        e2 = g2.edges[k]
        idx1 = new_id[e1.index]
        o1 = torch.argsort(idx1[0] * n + idx1[1])
        o2 = torch.argsort(e2.index[0] * n + e2.index[1])
        assert torch.equal(idx1[:, o1], e2.index[:, o2]), k
        assert torch.equal(e1.attr[o1], e2.attr[o2]), k
        assert torch.equal(e1.role[o1], e2.role[o2]) and torch.equal(e1.layer[o1], e2.layer[o2]), k


def test_permuting_hidden_channels_permutes_the_graph():
    model = small_model("cifar_resnet20").eval()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    twin = small_model("cifar_resnet20").eval()
    blk = twin.layer1[1]
    with torch.no_grad():
        blk.conv1.weight.copy_(blk.conv1.weight[perm])
        for t in (blk.bn1.weight, blk.bn1.bias, blk.bn1.running_mean, blk.bn1.running_var):
            t.copy_(t[perm])
        blk.conv2.weight.copy_(blk.conv2.weight[:, perm])
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)
    g1, g2 = to_graph(model), to_graph(twin)
    nodes = _layer_nodes(g1, "layer1.1.conv1")
    assert torch.equal(nodes, _layer_nodes(g2, "layer1.1.conv1"))
    new_id = torch.arange(g1.num_nodes)
    new_id[nodes[perm]] = nodes  # new channel j is old channel perm[j]
    assert not torch.equal(g1.x, g2.x)
    _assert_permuted(g1, g2, new_id)


def test_permuting_attention_heads_permutes_the_graph():
    model = small_model("vit_tiny_p4").eval()
    twin = small_model("vit_tiny_p4").eval()
    att = twin.encoder.layers[2].self_attention
    h, d = att.num_heads, att.head_dim
    hp = torch.tensor([2, 0, 1])
    dims = (hp[:, None] * d + torch.arange(d)).flatten()
    rows = torch.cat([dims, dims + h * d, dims + 2 * h * d])
    with torch.no_grad():
        att.qkv.weight.copy_(att.qkv.weight[rows])
        att.qkv.bias.copy_(att.qkv.bias[rows])
        att.proj.weight.copy_(att.proj.weight[:, dims])
    x = input_for(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)
    g1, g2 = to_graph(model), to_graph(twin)
    nodes = _layer_nodes(g1, "encoder.layers.encoder_layer_2.self_attention.qkv")
    new_id = torch.arange(g1.num_nodes)
    new_id[nodes[dims]] = nodes
    _assert_permuted(g1, g2, new_id)


def test_unsupported_layer_names_module_and_supported_types():
    model = small_model("cifar_resnet20")
    model.layer2[0].bn1 = torch.nn.InstanceNorm2d(model.layer2[0].bn1.num_features, affine=True)
    with pytest.raises(GraphError) as e:
        to_graph(model)
    msg = str(e.value)
    assert "layer2.0.bn1" in msg and "InstanceNorm2d" in msg and "Conv2d" in msg and "BatchNorm2d" in msg


def test_model_without_spec_is_refused():
    with pytest.raises(GraphError, match="input_shape"):
        to_graph(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_graph_layout_and_sparse_identities():
    g = to_graph(small_model("cifar_resnet20"))
    assert g.x.shape[1] == len(NODE_SLOTS) and g.x.dtype == torch.float32
    ident = g.edges["id"]
    # one edge per channel for each residual input; identity features are all 1
    assert ident.num_edges == int((g.node_role == NODE_ROLES.index("residual")).sum()) * 2
    assert torch.equal(ident.attr, torch.ones_like(ident.attr))
    assert set(g.edges) == {"k9", "k1", "id"}
    assert (g.node_role == NODE_ROLES.index("output")).sum() == 7
    assert (g.node_role == NODE_ROLES.index("input")).sum() == 3
    # masks: BN slots real on conv nodes, neutral elsewhere
    assert g.x_mask[:, :4].any() and not g.x_mask[g.node_role == NODE_ROLES.index("input")].any()
    assert torch.all(g.x[~g.x_mask] == torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0]).expand_as(g.x)[~g.x_mask])


@pytest.mark.parametrize("name", ["cifar_resnet20", "vit_tiny_p4"])
def test_graph_params_is_differentiable(name):
    model = small_model(name).eval()
    g = to_graph(model)
    x = g.x.clone().requires_grad_(True)
    ea = {k: v.attr.clone().requires_grad_(k != "id") for k, v in g.edges.items()}
    inp = input_for(model, batch=2)
    out = torch.func.functional_call(model, graph_params(g, x, ea), (inp,))
    with torch.no_grad():  # grad-enabled kernels may sum in another order: equal up to rounding
        torch.testing.assert_close(out, model(inp), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert (x.grad[~g.x_mask] == 0).all()
    for k, v in ea.items():
        if k != "id":
            assert v.grad.abs().sum() > 0, k
    with pytest.raises(GraphError, match="shape"):
        graph_params(g, x[:-1])


def _assert_safetensors_file(path) -> dict:
    """The file is a safetensors file and nothing else: an 8-byte little-endian header length, a JSON
    header whose entries (besides ``__metadata__``) are tensors with dtype, shape and data offsets that
    tile the rest of the file exactly. A pickle (protocol 2+ starts with 0x80) or a ``torch.save`` zip
    fails here. Returns the header."""
    raw = Path(path).read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK", "a pickle or a torch.save zip archive"
    n = int.from_bytes(raw[:8], "little")
    assert 2 <= n <= len(raw) - 8, f"header length {n} does not fit a {len(raw)}-byte file"
    header = json.loads(raw[8:8 + n])
    assert isinstance(header, dict)
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    for k, v in header.items():
        if k != "__metadata__":
            assert set(v) == {"dtype", "shape", "data_offsets"}, k
    assert spans and spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw), "bytes after the last tensor"
    return header


def test_safetensors_check_fails_on_pickles(tmp_path):
    model = small_model("cifar_resnet20")
    torch.save(model.state_dict(), tmp_path / "zip.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "plain.pkl", "legacy.pt"):
        with pytest.raises(AssertionError):
            _assert_safetensors_file(tmp_path / name)


def test_save_load_is_exact_and_pickle_free(tmp_path):
    model = small_model("vit_tiny_p4")
    g = to_graph(model)
    p = g.save(tmp_path / "g.safetensors")
    header = _assert_safetensors_file(p)
    assert "metaprune_graph" in header["__metadata__"] and "x" in header
    g2 = Graph.load(p)
    assert g2.spec == g.spec and torch.equal(g2.x, g.x) and torch.equal(g2.x_mask, g.x_mask)
    for k in g.edges:
        assert torch.equal(g2.edges[k].index, g.edges[k].index) and torch.equal(g2.edges[k].attr, g.edges[k].attr)
    assert_same_model(model, from_graph(g2))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFileError):
        Graph.load(tmp_path / "bad.safetensors")


def test_to_pyg():
    g = to_graph(small_model("cifar_resnet20"))
    d = g.to_pyg()
    assert d.num_nodes == g.num_nodes and torch.equal(d.edge_index_k9, g.edges["k9"].index)
    h = g.to_pyg(hetero=True)
    assert torch.equal(h["channel", "k1", "channel"].edge_attr, g.edges["k1"].attr)
    assert g.describe()["edge_groups"]["k9"] == {"edges": g.edges["k9"].num_edges, "features": 9}
