"""metaprune.pruning.prune gives torch-pruning's MetaPruner widths for the same model, ratio, criterion
(L2 group magnitude), ignored layers (the classifier) and round_to=1 (``tools/tp_parity.py`` runs the
full builder table into results/tp_parity.md). Small builders run in the default suite, the rest are slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import PruningError
from metaprune.pruning import PruneConfig, prune
from metaprune.pruning.structure import unwrapped_parameters

_spec = importlib.util.spec_from_file_location("tp_parity", Path(__file__).parents[2] / "tools" / "tp_parity.py")
tp_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp_parity)

#: about 1-8 s each on one core; ConvNeXt is the one whose layer scale was pruned on the wrong dim
FAST = ("convnext_tiny", "efficientnet_b0", "mnasnet0_5", "mobilenet_v3_small", "regnet_y_400mf", "resnet18",
        "squeezenet1_1")
#: builders torch-pruning itself cannot trace: metaprune must refuse them with one PruningError
TP_FAILS = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0")


def _params():
    return [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow], id=n)
            for n in tp_parity.BUILDERS if n not in TP_FAILS]


@pytest.mark.parametrize("name", _params())
def test_same_widths_as_torch_pruning(name):
    row = tp_parity.compare(name)
    assert row["mp_error"] is None, row
    assert row["diff"] == {}, row["diff"]
    if name.startswith("vit_"):  # torch-pruning's ViT keeps the old hidden_dim attribute and no longer runs
        assert row["tp_error"].startswith("the pruned model does not run"), row
        assert row["mp_macs"] < row["macs_before"], row
    else:
        assert row["tp_error"] is None, row
        assert row["mp_macs"] == row["tp_macs"] < row["macs_before"], row


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5"])
def test_channel_shuffle_builder_refused_like_torch_pruning(name):
    row = tp_parity.compare(name)
    assert row["tp_error"].startswith("ZeroDivisionError")  # torch-pruning 1.6 fails on it too
    assert row["mp_error"].startswith("PruningError: torch-pruning could not prune ShuffleNetV2"), row


class _ScaledBlock(nn.Module):
    """ConvNeXt's pattern: a residual branch scaled by a ``(C, 1, 1)`` layer scale."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, c).view(c, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * self.conv(x)


class _Net(nn.Module):
    def __init__(self, up: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = _ScaledBlock()
        self.up = nn.ConvTranspose2d(16, 24, 2, stride=2) if up else nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.up(self.block(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _tp_widths(model, x):
    import copy

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                                  ignored_layers=[m.head], round_to=1)
    pruner.step()
    return tp_parity.widths(m), m


@pytest.mark.parametrize("up", [False, True], ids=["layer_scale", "conv_transpose"])
def test_layer_scale_and_conv_transpose_pruned_like_torch_pruning(up):
    torch.manual_seed(0)
    model, x = _Net(up).eval(), torch.randn(1, 3, 8, 8)
    want, tpm = _tp_widths(model, x)
    res = prune(model, PruneConfig(ratio=0.5, round_to=1, criterion="l2"), example_input=x)
    got = tp_parity.widths(res.model)
    assert got == want
    # the residual stream (stem + block) and the transposed conv's outputs are halved, as torch-pruning does
    assert got["stem"] == 8 and got["up"] == 12
    assert res.model.block.layer_scale.shape == (8, 1, 1)
    assert torch.equal(res.model.block.layer_scale, tpm.block.layer_scale)
    if up:
        assert res.model.up.weight.shape == (8, 12, 2, 2)


def test_unwrapped_parameters_use_torch_pruning_dims():
    model = _Net(up=True)
    dims = {id(p): d for p, d in unwrapped_parameters(model)}
    assert dims == {id(model.block.layer_scale): 0}  # (C, 1, 1): dim 0; the transposed conv is torch-pruning's own


def test_shuffle_error_is_one_pruning_error_not_zero_division():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(PruningError, match="channel shuffle"):
        prune(model, PruneConfig(ratio=0.5, round_to=1, criterion="l2"), example_input=torch.randn(1, 3, 64, 64))
