"""Round trips of pruned models: random non-uniform widths and models pruned by torch-pruning."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from graph_helpers import (
    assert_round_trips,
    assert_same_model,
    assert_same_outputs,
    input_for,
    randomise,
    small_model,
)

from metaprune.graph import from_graph, to_graph
from metaprune.models import get_widths


def _random_prune(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Remove a random number of random channels from every DepGraph group (classifier kept)."""
    g = torch.Generator().manual_seed(seed)
    x = input_for(model, batch=1)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    groups = list(dg.get_all_groups(ignored_layers=[last], root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
    for grp in groups:
        dep = grp[0].dep
        mod = dep.target.module
        n = mod.out_channels if isinstance(mod, torch.nn.Conv2d) else mod.out_features
        k = int(torch.randint(1, max(2, n // 2), (1,), generator=g))
        idxs = torch.randperm(n, generator=g)[:k].tolist()
        pg = dg.get_pruning_group(dep.target.module, dep.handler, idxs)
        if dg.check_pruning_group(pg):
            pg.prune()
    return model


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_vgg11_bn", "resnet18"])
def test_random_widths_round_trip(name):
    model = _random_prune(small_model(name), seed=3)
    widths = [w.get("out_channels") for w in get_widths(model).values() if "out_channels" in w]
    assert len(set(widths)) > 4, "pruning should leave non-uniform widths"
    randomise(model, seed=5)
    x = input_for(model, batch=2)
    assert_round_trips(model, x)


def test_torch_pruning_pruner_output_round_trips():
    model = small_model("cifar_resnet56")
    x = input_for(model, batch=2)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=0.4, ignored_layers=[model.fc])
    pruner.step()
    g = to_graph(model.eval())
    assert g.num_nodes < to_graph(small_model("cifar_resnet56")).num_nodes
    back = from_graph(g)
    assert_same_model(model, back)
    assert_same_outputs(model, back, x)


def _prune_vit(model, seed: int):
    """Drop whole attention heads and random MLP units of a ViT (non-uniform per block)."""
    g = torch.Generator().manual_seed(seed)
    for blk in model.encoder.layers:
        att = blk.self_attention
        h, d, c = att.num_heads, att.head_dim, att.qkv.in_features
        keep = sorted(torch.randperm(h, generator=g)[: int(torch.randint(1, h + 1, (1,), generator=g))].tolist())
        dims = torch.tensor([hh * d + i for hh in keep for i in range(d)])
        rows = torch.cat([dims, dims + h * d, dims + 2 * h * d])
        qkv, proj = torch.nn.Linear(c, len(rows)), torch.nn.Linear(len(dims), c)
        with torch.no_grad():
            qkv.weight.copy_(att.qkv.weight[rows]), qkv.bias.copy_(att.qkv.bias[rows])
            proj.weight.copy_(att.proj.weight[:, dims]), proj.bias.copy_(att.proj.bias)
        att.qkv, att.proj, att.num_heads = qkv, proj, len(keep)
        fc1, fc2 = blk.mlp[0], blk.mlp[3]
        units = torch.randperm(fc1.out_features, generator=g)[: int(torch.randint(8, fc1.out_features, (1,), generator=g))]
        n1, n2 = torch.nn.Linear(fc1.in_features, len(units)), torch.nn.Linear(len(units), fc2.out_features)
        with torch.no_grad():
            n1.weight.copy_(fc1.weight[units]), n1.bias.copy_(fc1.bias[units])
            n2.weight.copy_(fc2.weight[:, units]), n2.bias.copy_(fc2.bias)
        blk.mlp[0], blk.mlp[3] = n1, n2
    return model


def test_vit_with_pruned_heads_and_mlp_round_trips():
    model = _prune_vit(small_model("vit_tiny_p4"), seed=2)
    x = input_for(model, batch=2)
    assert_round_trips(model, x)
