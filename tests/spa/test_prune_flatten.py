"""A flatten after a spatial map: a consumer reads each channel at `stride` consecutive positions, so the
group unit of a position is torch-pruning's root index (c), not the position modulo the group size."""

import copy

import torch
from spa_helpers import trained_adapter
from torch import nn

from spa import fuse_model
from spa.masks import functional_importance, step_keep
from spa.prune import apply_masks, build_graph, channel_groups, layer_masks, physically_prune


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.relu(self.fc1(torch.flatten(x, 1))))


def _adapted():
    torch.manual_seed(0)
    src = _Net().eval()
    with torch.no_grad():
        src.bn.running_mean.normal_(0, 0.2)
        src.bn.bias.normal_(0, 0.5)
    m = trained_adapter(src, rank=2, num_classes=3)
    dg = build_graph(m, torch.zeros(1, 1, 8, 8))
    return m, dg, channel_groups(m, dg, m.get_submodule(m.spa_head))


def test_flatten_consumer_units_follow_the_channel():
    m, _, groups = _adapted()
    g = next(g for g in groups if g.root == "conv")
    fc1 = next(mem for mem in g.members if mem.name == "fc1" and mem.dim == "in")
    assert torch.equal(fc1.unit_index(g.size), torch.tensor(fc1.idxs) // 4)
    keep = torch.tensor([False, True, True, True, True, True])
    mask = layer_masks(m, [g], {"conv": keep})["fc1"]["in"]
    assert torch.equal(mask, torch.arange(24) >= 4)  # channel 0's four positions, not positions 0, 6, 12, 18
    # the functional criterion reads channel c's consumer columns 4c..4c+3
    cols = m.get_submodule("fc1").fused()[0].detach().double().norm(dim=0) ** 2
    want = cols.view(6, 4).sum(1).sqrt()
    got = functional_importance(m, g)
    gamma = m.get_submodule("bn")
    prod = (gamma.weight.detach().double() ** 2 + gamma.bias.detach().double() ** 2).sqrt()
    torch.testing.assert_close(got, (prod / prod.mean()) * (want / want.mean()), rtol=1e-9, atol=1e-12)


def test_masked_model_equals_the_pruned_one():
    m, dg, groups = _adapted()
    apply_masks(m, layer_masks(m, groups, step_keep(m, groups, 0.5, criterion="l2")))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        masked = m(x)
        pruned = copy.deepcopy(m)
        dg2 = build_graph(pruned, torch.zeros(1, 1, 8, 8))
        physically_prune(pruned, dg2, channel_groups(pruned, dg2, pruned.get_submodule(pruned.spa_head)))
        plain = fuse_model(pruned).eval()
        assert plain.conv.out_channels == 3 and plain.fc1.in_features == 12
        torch.testing.assert_close(plain(x), masked, rtol=1e-5, atol=1e-6)
