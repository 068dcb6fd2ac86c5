"""Models that are not ``(N, classes)`` classifiers: feature extractors, several outputs, dict inputs,
channel shuffles. Each is pruned with its output shapes kept (``keep_output``) or refused with one
PruningError; never a traceback from inside metaprune or a quietly different output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import PruningError
from metaprune.pruning import PruneConfig, prune
from metaprune.pruning.structure import output_layers


def _cbr(i, o, s=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class Backbone(nn.Module):
    """A feature extractor with two taps (a tuple output, as FPN backbones return)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.c1 = _cbr(16, 16)
        self.c2 = _cbr(16, 32, 2)
        self.c3 = _cbr(32, 32)

    def forward(self, x):
        a = self.c1(self.stem(x))
        return a, self.c3(self.c2(a))


class DictNet(nn.Module):
    """Takes a dict of inputs (``model(**inputs)``) and returns a dict."""

    def __init__(self):
        super().__init__()
        self.img = _cbr(3, 16)
        self.aux = _cbr(1, 16)
        self.mid = _cbr(16, 24)
        self.out = nn.Conv2d(24, 5, 1)

    def forward(self, image, mask):
        return {"seg": self.out(self.mid(self.img(image) + self.aux(mask)))}


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle."""

    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 16)
        self.b = _cbr(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.b(x).mean((2, 3)))


def _shapes(out):
    return [tuple(t.shape) for t in (out.values() if isinstance(out, dict) else out)]


def _tp_widths(model, x, ignored_names):
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                         ignored_layers=[mods[n] for n in ignored_names], round_to=1).step()
    return {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}


def test_tuple_output_backbone_refused_without_keep_output():
    torch.manual_seed(0)
    model, x = Backbone().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(PruningError, match=r"output shape \(output\[0\] \(16, 16, 16\) -> \(8, 16, 16\).*--keep-output"):
        prune(model, PruneConfig(ratio=0.5, round_to=1), example_input=x)


def test_tuple_output_backbone_keep_output_prunes_the_inside_like_torch_pruning():
    torch.manual_seed(0)
    model, x = Backbone().eval(), torch.randn(2, 3, 16, 16)
    assert output_layers(model, x[:1]) == ["c3.0", "c1.0"]  # the convs producing the two taps
    res = prune(model, PruneConfig(ratio=0.5, round_to=1, keep_output=True), example_input=x)
    with torch.no_grad():
        assert _shapes(res.model(x)) == _shapes(model(x))
    got = {n: c.out_channels for n, c in res.model.named_modules() if isinstance(c, nn.Conv2d)}
    assert got == {"stem.0": 8, "c1.0": 16, "c2.0": 16, "c3.0": 32}
    assert got == _tp_widths(model, x[:1], ["c3.0", "c1.0"])
    assert res.macs_after < res.macs_before


def test_dict_input_and_dict_output():
    torch.manual_seed(0)
    model = DictNet().eval()
    x = {"image": torch.randn(2, 3, 8, 8), "mask": torch.randn(2, 1, 8, 8)}
    res = prune(model, PruneConfig(ratio=0.5, round_to=1), example_input=x)
    with torch.no_grad():
        assert res.model(**x)["seg"].shape == (2, 5, 8, 8)
    got = {n: c.out_channels for n, c in res.model.named_modules() if isinstance(c, nn.Conv2d)}
    assert got == {"img.0": 8, "aux.0": 8, "mid.0": 12, "out": 5}
    assert got == _tp_widths(model, {k: v[:1] for k, v in x.items()}, ["out"])
    assert res.macs_after < res.macs_before


def test_channel_shuffle_pruned_like_torch_pruning():
    """A shuffle torch-pruning can trace is pruned as it prunes it (the torchvision ShuffleNet, which it
    cannot trace, is one PruningError: tests/pruning/test_tp_parity.py)."""
    torch.manual_seed(0)
    model, x = Shuffle().eval(), torch.randn(1, 3, 8, 8)
    res = prune(model, PruneConfig(ratio=0.5, round_to=1), example_input=x)
    assert res.model(x).shape == (1, 10)
    got = {n: c.out_channels for n, c in res.model.named_modules() if isinstance(c, nn.Conv2d)}
    assert got == _tp_widths(model, x, ["head"]) == {"a.0": 8, "b.0": 8}


def test_feature_map_output_kept():
    """A single-output feature extractor: its last conv is protected (the default), the inside is pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(_cbr(3, 16), _cbr(16, 32), nn.Conv2d(32, 64, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    res = prune(model, PruneConfig(ratio=0.5, round_to=1), example_input=x)
    assert res.model(x).shape == (1, 64, 8, 8)
    assert [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 64]
