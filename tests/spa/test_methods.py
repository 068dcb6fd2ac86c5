"""Each method's fuse rule is exact, starts at the source function, and masks commute with slicing."""

import pytest
import torch
from torch import nn

from metaprune.errors import UnknownNameError
from metaprune.models.layers import SelfAttention
from spa.methods import METHODS, get_method

CONV_METHODS = ["splora", "sppara", "hydra", "lora", "full"]


def _randomise(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _reference(layer, x):
    """The method's function written out branch by branch (not through ``fused()``)."""
    w, b = layer.weight, layer.bias
    conv = layer.kind == "conv"
    op = (lambda x, w, b=None: nn.functional.conv2d(x, w, b, **layer.conv_args)) if conv else nn.functional.linear
    y = op(x, w, b)
    stride = layer.conv_args.get("stride", 1)
    point = (lambda x, m, s=stride: nn.functional.conv2d(x, m[:, :, None, None], stride=s)) if conv \
        else (lambda x, m, s=1: x @ m.T)
    if layer.method in ("splora", "lora", "hydra"):
        y = y + getattr(layer, "scale", 1.0) * point(point(x, layer.lora_A), layer.lora_B, 1)
    if layer.method == "sppara":
        y = y + point(x, layer.para_P)
    if layer.method == "hydra":
        base = op(x, w, b)
        # sequential branch applied to the frozen layer's output, channel-wise
        mix = layer.seq_B @ layer.seq_A
        y = y + (torch.einsum("oc,nc...->no...", mix, base) if conv else base @ mix.T)
    return y


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_fuse_rule_exact(method, stride):
    cfg_cls, cls = get_method(method)
    base = nn.Conv2d(6, 10, 3, stride, 1, bias=True)
    layer = cls(base, cfg_cls(rank=3))
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(layer(x), base(x), atol=1e-6) or method == "full"
    _randomise(layer)
    assert (layer(x) - _reference(layer, x)).abs().max() < 1e-5
    assert (layer.to_module()(x) - layer(x)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["splora", "hydra", "lora"])
def test_linear_and_attention_fuse_exact(method):
    cfg_cls, cls = get_method(method)
    base = nn.Linear(8, 12)
    layer = cls(base, cfg_cls(rank=2))
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))  # zero-initialised up-projection: exactly the source
    _randomise(layer)
    assert (layer(x) - _reference(layer, x)).abs().max() < 1e-5
    attn = SelfAttention(8, 2)
    ref = attn(torch.randn(1, 5, 8))[0]
    attn.qkv, attn.proj = cls(attn.qkv, cfg_cls(rank=2)), cls(attn.proj, cfg_cls(rank=2))
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    assert attn(x)[0].shape == ref.shape
    _randomise(attn.qkv)
    fused_out = attn(x)[0]
    attn.qkv, attn.proj = attn.qkv.to_module(), attn.proj.to_module()
    assert (attn(x)[0] - fused_out).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["splora", "sppara", "hydra", "full"])
def test_mask_commutes_with_slicing(method):
    """(m_out m_inᵀ) ⊙ (W + ΔW) restricted to kept channels == the layer built from sliced factors."""
    cfg_cls, cls = get_method(method)
    layer = cls(nn.Conv2d(7, 9, 3, 1, 1, bias=True), cfg_cls(rank=3))
    _randomise(layer)
    ko, ki = torch.tensor([0, 2, 3, 7, 8]), torch.tensor([1, 2, 5, 6])
    layer.out_mask.zero_()[ko] = 1
    layer.in_mask.zero_()[ki] = 1
    w_full, b_full = layer.fused()
    layer.keep_channels("out", ko)
    layer.keep_channels("in", ki)
    w, b = layer.fused()
    assert torch.allclose(w, w_full[ko][:, ki], atol=1e-6)
    assert torch.allclose(b, b_full[ko], atol=1e-6)


def test_sppara_refuses_linear_and_unknown_method():
    assert not get_method("sppara")[1].supports(nn.Linear(3, 3))
    assert set(METHODS) >= {"splora", "sppara", "hydra", "lora"}
    with pytest.raises(UnknownNameError, match="splora"):
        get_method("nope")
