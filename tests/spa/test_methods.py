"""Each method's fuse rule is exact, starts at the source function, and masks commute with slicing."""

import copy

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


def _reference(layer, x, base_conv=None):
    """The method's function written out branch by branch (not through ``fused()``).

    The frozen branch runs through a real ``nn.Conv2d`` configured like the source layer
    (``base_conv``: padding mode included) with the layer's current weights.
    """
    w, b = layer.weight, layer.bias
    conv = layer.kind == "conv"
    if conv:
        ref = copy.deepcopy(base_conv)

        def op(x, w, b=None):
            return ref._conv_forward(x, w, b)
    else:
        op = nn.functional.linear
    y = op(x, w, b)
    stride = base_conv.stride if conv else 1
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
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_conv_fuse_rule_exact(method, stride, padding_mode):
    cfg_cls, cls = get_method(method)
    torch.manual_seed(0)
    base = nn.Conv2d(6, 10, 3, stride, 1, bias=True, padding_mode=padding_mode)
    with torch.no_grad():
        base.bias.normal_()
    layer = cls(base, cfg_cls(rank=3))
    x = torch.randn(2, 6, 9, 9) + 1.0  # non-zero border: zero and reflect padding differ
    # every method starts exactly at the source function (zero up-projections; full copies the weights)
    assert (layer(x) - base(x)).abs().max() < 1e-6
    assert (layer.to_module()(x) - base(x)).abs().max() < 1e-6
    _randomise(layer)
    y = layer(x)
    assert (y - base(x)).abs().max() > 1e-2  # the randomised adapter really changes the function
    assert (y - _reference(layer, x, base)).abs().max() < 1e-5
    fused = layer.to_module()
    assert fused.padding_mode == padding_mode
    assert (fused(x) - y).abs().max() < 1e-5


def test_unsupported_padding_is_refused_and_nonfinite_fusion_raises():
    from metaprune.errors import ConfigError

    _, cls = get_method("splora")
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.padding_mode = "mirror"  # not a mode adapted layers reproduce
    assert not cls.supports(conv)
    with pytest.raises(ConfigError, match="padding_mode"):
        cls(conv, get_method("splora")[0](rank=2))
    layer = cls(nn.Conv2d(3, 4, 3, padding=1), get_method("splora")[0](rank=2))
    with torch.no_grad():
        layer.lora_B[1, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        layer.to_module()


def _ref_attention(attn, x):
    """Multi-head attention written out with the layers' reference functions (no fusion, no SDPA)."""
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv_ref(x).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.proj_ref((a @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("method", ["splora", "hydra", "lora"])
def test_linear_and_attention_fuse_exact(method):
    cfg_cls, cls = get_method(method)
    base = nn.Linear(8, 12)
    layer = cls(base, cfg_cls(rank=2))
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))  # zero-initialised up-projection: exactly the source
    _randomise(layer)
    assert (layer(x) - base(x)).abs().max() > 1e-2
    assert (layer(x) - _reference(layer, x)).abs().max() < 1e-5
    # attention: adapted qkv/proj start at the source, then match a hand-written attention
    torch.manual_seed(0)
    attn = SelfAttention(8, 2)
    x = torch.randn(2, 5, 8)
    source_out = attn(x)[0]
    attn.qkv, attn.proj = cls(attn.qkv, cfg_cls(rank=2)), cls(attn.proj, cfg_cls(rank=2))
    assert (attn(x)[0] - source_out).abs().max() < 1e-6
    _randomise(attn.qkv)
    _randomise(attn.proj)
    adapted_out = attn(x)[0]
    assert (adapted_out - source_out).abs().max() > 1e-2
    attn.qkv_ref = lambda t, q=attn.qkv: _reference(q, t)
    attn.proj_ref = lambda t, p=attn.proj: _reference(p, t)
    assert (adapted_out - _ref_attention(attn, x)).abs().max() < 1e-5
    attn.qkv, attn.proj = attn.qkv.to_module(), attn.proj.to_module()
    assert isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
    assert (attn(x)[0] - adapted_out).abs().max() < 1e-5


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
