"""Exact round trips model -> graph -> model for every registered architecture."""

from __future__ import annotations

import pytest
import torch
from graph_helpers import assert_round_trips, assert_same_model, assert_same_outputs, input_for, small_model

from metaprune.graph import from_graph, to_graph
from metaprune.models import list_models

HEAVY = {"vit_b_16", "resnet50"}
LIGHT = [n for n in list_models() if n not in HEAVY]


@pytest.mark.parametrize("name", LIGHT)
def test_round_trip_exact(name):
    kw = {"in_chans": 1} if name == "cifar_resnet20" else {}
    model = small_model(name, **kw)
    assert_round_trips(model, input_for(model, batch=2))


def test_round_trip_resnet50():
    model = small_model("resnet50")
    assert_round_trips(model, input_for(model, batch=2))


def test_round_trip_vit_b_16():
    """ViT-B/16 built once, at 32 px (2x2 patches) to keep the forward cheap; the graph keeps
    its ~70M edges, so this also checks that the full-width encoding works."""
    model = small_model("vit_b_16", image_size=32).eval()
    g = to_graph(model, cache=False)
    assert g.edges["qkv3"].feature_dim == 3 and g.edges["k256"].feature_dim == 256
    back = from_graph(g)
    del g
    assert_same_model(model, back)
    assert_same_outputs(model, back, input_for(model, batch=1))


def test_graph_does_not_alias_model_or_change_it():
    model = small_model("cifar_resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = to_graph(model)
    assert model.training
    back = from_graph(g)
    with torch.no_grad():
        for p in back.parameters():
            p.add_(1.0)
    g2 = to_graph(model)
    assert torch.equal(g.x, g2.x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cached_structure_gives_the_same_graph():
    a, b = small_model("vit_tiny_p4"), small_model("vit_tiny_p4")
    torch.nn.init.normal_(b.heads.head.weight)
    cold = to_graph(b, cache=False)
    to_graph(a)
    warm = to_graph(b)
    assert warm.spec == cold.spec
    assert torch.equal(warm.x, cold.x) and torch.equal(warm.x_mask, cold.x_mask)
    for k, e in cold.edges.items():
        w = warm.edges[k]
        assert torch.equal(w.index, e.index) and torch.equal(w.attr, e.attr)
        assert torch.equal(w.role, e.role) and torch.equal(w.layer, e.layer)
