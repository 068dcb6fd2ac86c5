"""The meta-training loss terms: functional (BN-aware, scale-invariant) sparsity and soft pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from metaprune.metanet.loss import criterion_norms, dependency_groups, group_sparsity, soft_prune
from metaprune.models import create_model
from metaprune.pruning import PruneConfig
from metaprune.pruning.curve import prune_once

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial BN so every slice matters
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m, dependency_groups(m, SHAPE)


def test_functional_sparsity_ignores_what_batchnorm_undoes(net):
    m, groups = net
    p = dict(m.state_dict())
    base = group_sparsity(p, groups, mode="functional")
    q = dict(p)
    q["conv1.weight"] = p["conv1.weight"] * torch.rand(16, 1, 1, 1)  # per channel; BN follows, no consumer group
    q["layer2.1.conv1.weight"] = p["layer2.1.conv1.weight"] * 3.0  # a whole slice
    q["layer3.0.bn1.weight"] = p["layer3.0.bn1.weight"] * 0.1
    assert torch.allclose(group_sparsity(q, groups, mode="functional"), base, rtol=1e-5)
    assert not torch.allclose(group_sparsity(q, groups, mode="depgraph"), group_sparsity(p, groups), rtol=1e-3)
    # moving norm away from one channel's BN weight changes it
    q["layer3.0.bn1.weight"] = p["layer3.0.bn1.weight"].clone()
    q["layer3.0.bn1.weight"][0] = 0.0
    assert not torch.allclose(group_sparsity(q, groups, mode="functional"), base, rtol=1e-3)
    with pytest.raises(ValueError):
        group_sparsity(p, groups, mode="nope")


def test_hard_soft_prune_is_torch_pruning_uniform_l2(net):
    m, groups = net
    x = torch.randn(4, *SHAPE)
    for ratio in (0.25, 0.4):
        gated = soft_prune(dict(m.state_dict()), groups, ratio, temperature=1e-6)
        pruned = prune_once(copy.deepcopy(m), PruneConfig(ratio=ratio, criterion="l2", round_to=1), ratio,
                            torch.randn(1, *SHAPE))  # exact widths: what soft_prune's top-k keeps
        with torch.no_grad():
            assert torch.allclose(functional_call(m, gated, (x,)), pruned.eval()(x), atol=1e-5)


def test_soft_prune_gradient_reaches_ranking_norms(net):
    m, groups = net
    p = {k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k) for k, v in m.state_dict().items()}
    assert soft_prune(p, groups, 0.0) == p  # nothing removed
    gated = soft_prune(p, groups, 0.3, temperature=0.1)
    functional_call(m, gated, (torch.randn(2, *SHAPE),)).square().sum().backward()
    # conv weights that feed BN only enter through the gate's ranking norm: they still get a gradient
    g = p["layer1.0.conv1.weight"].grad
    assert g is not None and g.abs().sum() > 0
    n = criterion_norms({k: v.detach() for k, v in p.items()}, groups[0])
    assert n.shape == (groups[0].size,) and bool((n > 0).all())
    with pytest.raises(ValueError):
        soft_prune(p, groups, 1.0)


def test_straight_through_gates_are_hard_forward_soft_backward(net):
    m, groups = net
    x = torch.randn(4, *SHAPE)
    p = {k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k) for k, v in m.state_dict().items()}
    hard = soft_prune(p, groups, 0.3, temperature=0.1, straight_through=True)
    exact = soft_prune({k: v.detach() for k, v in p.items()}, groups, 0.3, temperature=1e-6)
    with torch.no_grad():
        assert torch.allclose(functional_call(m, hard, (x,)), functional_call(m, exact, (x,)), atol=1e-5)
    functional_call(m, hard, (x,)).square().sum().backward()
    assert p["layer1.0.conv1.weight"].grad.abs().sum() > 0


def test_soft_prune_keeps_a_channel_in_tiny_groups():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.BatchNorm2d(1), torch.nn.ReLU(),
                            torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3)).eval()
    groups = dependency_groups(m, (1, 8, 8))
    assert sorted(g.size for g in groups) == [1, 2]
    p = dict(m.state_dict())
    for r in (0.1, 0.42, 0.6):
        gated = soft_prune(p, groups, r, straight_through=True)
        assert (gated["1.weight"] != 0).all()  # the only channel of a 1-channel group is never removed
        assert int((gated["4.weight"] != 0).sum()) >= 1
