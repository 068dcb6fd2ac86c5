"""torchvision's own attention layers through prune -> save -> load (issue 13, items 2 and 5):
``nn.MultiheadAttention`` in ``VisionTransformer`` (head size pruned, the same positions in every head, so
``embed_dim`` stays ``num_heads x head_dim``) and the Swin window attention (pruned as one layer with its
residual stream; the patch merging's 4-way channel concatenation followed). Tiny models built by trusted
factories in this module, so every case runs in about a second."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer as sw
from torchvision.models.maxvit import MaxVit
from torchvision.models.vision_transformer import VisionTransformer

from metaprune.errors import PruningError
from metaprune.io import load_model, save_model
from metaprune.models import create_model, get_widths, trusted_code
from metaprune.pruning import PruneConfig, prune


def tiny_vit(num_classes=10, in_chans=3, image_size=32):
    return VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                             mlp_dim=96, num_classes=num_classes)


def tiny_swin(num_classes=10, in_chans=3, image_size=32):
    # 8x8 tokens, windows of 4 (the odd blocks shifted by 2), one patch merging to 4x4
    return sw.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              stochastic_depth_prob=0.0, num_classes=num_classes)


def tiny_swin_v2(num_classes=10, in_chans=3, image_size=32):
    return sw.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              stochastic_depth_prob=0.0, num_classes=num_classes, block=sw.SwinTransformerBlockV2,
                              downsample_layer=sw.PatchMergingV2)


def tiny_maxvit(num_classes=10, in_chans=3, image_size=32):
    # grid 16 -> 8 -> 4 after the stem and the two blocks, windows / grids of 2
    return MaxVit(input_size=(image_size, image_size), stem_channels=16, partition_size=2, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=num_classes)


def _build(factory: str) -> nn.Module:
    torch.manual_seed(0)
    with trusted_code():
        return create_model(f"{__name__}:{factory}", num_classes=10, image_size=32).eval()


def _prune(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(model, PruneConfig(**kw)).model.eval()


def _kept_rows(orig: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of ``orig``'s rows that ``pruned``'s rows are (in order)."""
    out = []
    for row in pruned:
        hits = [i for i in range(orig.shape[0]) if torch.equal(orig[i], row)]
        assert len(hits) == 1, "pruned row is not one row of the original"
        out.append(hits[0])
    return out


def _reload_same(pruned: nn.Module, tmp_path) -> nn.Module:
    with trusted_code():
        save_model(pruned, tmp_path)
        loaded, _ = load_model(tmp_path)
    assert get_widths(loaded) == get_widths(pruned)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = pruned(x), loaded(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    return loaded


@pytest.mark.parametrize("round_to", [1, "auto"])
def test_multihead_attention_keeps_heads_and_prunes_the_same_positions_in_each(tmp_path, round_to):
    model = _build("tiny_vit")
    pruned = _prune(model, ratio=0.3, round_to=round_to)
    a0, a = model.encoder.layers[0].self_attention, pruned.encoder.layers[0].self_attention
    assert a.num_heads == 4 and a.embed_dim < 64
    assert a.embed_dim == a.num_heads * a.head_dim == a.kdim == a.vdim == pruned.hidden_dim
    assert pruned.class_token.shape[-1] == pruned.encoder.pos_embedding.shape[-1] == a.embed_dim
    # the residual channels kept: from the patch embedding's rows; every head keeps the same positions
    keep = _kept_rows(model.conv_proj.weight.flatten(1), pruned.conv_proj.weight.flatten(1))
    hd0 = 64 // 4
    per_head = [sorted(k % hd0 for k in keep if k // hd0 == h) for h in range(4)]
    assert all(p == per_head[0] for p in per_head) and len(per_head[0]) == a.head_dim
    # and the attention's own weights are those rows / columns of the original
    rows = keep + [64 + k for k in keep] + [128 + k for k in keep]
    assert torch.equal(a.in_proj_weight, a0.in_proj_weight[rows][:, keep])
    assert torch.equal(a.out_proj.weight, a0.out_proj.weight[keep][:, keep])
    _reload_same(pruned, tmp_path)


def test_width_rounding_is_per_head():
    """torch-pruning rounds a grouped width with the per-group count against the whole width (64 wide, 4 heads,
    ratio 0.3, round_to 8: 5 of 16 per head asked, rounded to 8 per head -> 32 kept). Per head with multiple
    8 / gcd(8, 4) = 2: 10 of 16 kept per head, 40 in all, a multiple of 8."""
    pruned = _prune(_build("tiny_vit"), ratio=0.3, round_to=8)
    a = pruned.encoder.layers[0].self_attention
    assert (a.embed_dim, a.head_dim, pruned.hidden_dim) == (40, 10, 40)
    assert pruned.encoder.layers[0].mlp[0].out_features == 64  # 96 -> 67 -> 64: ungrouped layers as before


def test_multihead_attention_untouched_without_prune_heads():
    model = _build("tiny_vit")
    pruned = _prune(model, ratio=0.3, prune_heads=False, round_to=1)
    a = pruned.encoder.layers[0].self_attention
    assert (a.embed_dim, a.num_heads, pruned.hidden_dim) == (64, 4, 64)
    assert pruned.encoder.layers[0].mlp[0].out_features < 96  # the MLPs are still pruned


@pytest.mark.parametrize("factory", ["tiny_swin", "tiny_swin_v2"])
def test_swin_window_attention_pruned_as_one_layer(tmp_path, factory):
    model = _build(factory)
    pruned = _prune(model, ratio=0.3, round_to=1)
    blk0, blk = model.features[1][1], pruned.features[1][1]  # a shifted block of stage 1
    a0, a = blk0.attn, blk.attn
    c = a.qkv.in_features
    assert c < 24 and c % a.num_heads == 0 and a.num_heads == 2
    assert a.qkv.out_features == 3 * c and a.proj.in_features == a.proj.out_features == c
    for per_head in ("relative_position_bias_table", "logit_scale"):  # V1 / V2: per head, unchanged
        if hasattr(a0, per_head):
            assert torch.equal(getattr(a, per_head), getattr(a0, per_head))
    keep = _kept_rows(model.features[0][0].weight.flatten(1), pruned.features[0][0].weight.flatten(1))
    hd0 = 24 // 2
    assert sorted(k % hd0 for k in keep if k < hd0) == sorted(k % hd0 for k in keep if k >= hd0)
    rows = keep + [24 + k for k in keep] + [48 + k for k in keep]
    assert torch.equal(a.qkv.weight, a0.qkv.weight[rows][:, keep])
    assert torch.equal(a.qkv.bias, a0.qkv.bias[rows])
    assert torch.equal(a.proj.weight, a0.proj.weight[keep][:, keep])
    # patch merging: the 4C norm / reduction inputs are the kept channels of each of the 4 neighbours
    m0, m = model.features[2], pruned.features[2]
    cat = [j * 24 + k for j in range(4) for k in keep]
    assert torch.equal(m.reduction.weight, m0.reduction.weight[:, cat][_kept_rows(m0.reduction.weight[:, cat],
                                                                                 m.reduction.weight)])
    _reload_same(pruned, tmp_path)


def test_maxvit_attention_head_size_follows_the_residual(tmp_path):
    model = _build("tiny_maxvit")
    norm0 = model.blocks[0].layers[0].layers.window_attention.attn_layer[0]
    with torch.no_grad():
        norm0.weight.copy_(torch.rand(32) + 0.5)  # distinct values: they tell which channels were kept
    pruned = _prune(model, ratio=0.3, round_to=1)
    part0, part = model.blocks[0].layers[0].layers.window_attention, pruned.blocks[0].layers[0].layers.window_attention
    a0, a = part0.attn_layer[1], part.attn_layer[1]
    c = a.to_qkv.in_features
    assert c < 32 and a.n_heads == 2 and a.head_dim * a.n_heads == c  # head_dim is what forward reshapes by
    assert a.to_qkv.out_features == 3 * c and a.merge.in_features == a.merge.out_features == c
    keep = _kept_rows(norm0.weight[:, None], part.attn_layer[0].weight[:, None])
    assert sorted(k % 16 for k in keep if k < 16) == sorted(k % 16 for k in keep if k >= 16)  # same in each head
    rows = keep + [32 + k for k in keep] + [64 + k for k in keep]
    assert torch.equal(a.to_qkv.weight, a0.to_qkv.weight[rows][:, keep])
    assert torch.equal(a.merge.weight, a0.merge.weight[keep][:, keep])
    assert torch.equal(a.relative_position_bias_table, a0.relative_position_bias_table)
    _reload_same(pruned, tmp_path)


def test_swin_search_target_and_gate_refused():
    model = _build("tiny_swin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune(model, PruneConfig(speedup=1.5, round_to=1))
    assert res.target_met and abs(res.speedup / 1.5 - 1) <= 0.05
    calib = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(PruningError, match="criterion 'gate' is not available for SwinTransformer"):
        prune(model, PruneConfig(ratio=0.3, criterion="gate"), calibration=calib)
    with pytest.raises(PruningError, match="--reconstruct is not available for SwinTransformer"):
        prune(model, PruneConfig(ratio=0.3, reconstruct=True), calibration=calib)
    with warnings.catch_warnings():  # the default ("auto") skips the refit here and says so
        warnings.simplefilter("ignore")
        res = prune(model, PruneConfig(ratio=0.3), calibration=calib)
    assert "not available for SwinTransformer" in res.info["reconstruct"]["skipped"]


def test_edited_attention_widths_are_refused():
    """A file whose MaxViT head size (or Swin q/k/v width) disagrees with the tensors: one ModelFileError."""
    from metaprune.errors import ModelFileError
    from metaprune.models.widths import check_layer_shapes

    model = _build("tiny_maxvit")
    check_layer_shapes(model)
    attn = model.blocks[0].layers[0].layers.window_attention.attn_layer[1]
    attn.head_dim = 8
    with pytest.raises(ModelFileError, match="head_dim=8 x 2 heads is not the width 32"):
        check_layer_shapes(model)
    swin = _build("tiny_swin")
    swin.features[1][0].attn.num_heads = 5
    with pytest.raises(ModelFileError, match="C a multiple of the heads"):
        check_layer_shapes(swin)


@pytest.mark.parametrize("factory", ["tiny_swin", "tiny_maxvit"])
def test_pruned_bare_state_dict_reloads_with_arch(tmp_path, factory):
    """A torch.save'd state dict (no widths stored): Swin keeps its heads (no head_dim attribute to read),
    MaxViT's head_dim comes from the q/k/v width (MaxViT builds for one input size: it is given)."""
    pruned = _prune(_build(factory), ratio=0.3, round_to=1)
    torch.save(pruned.state_dict(), tmp_path / "p.pt")
    with trusted_code():
        loaded, _ = load_model(tmp_path / "p.pt", arch=f"{__name__}:{factory}", arch_args={"image_size": 32})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), loaded(x), rtol=1e-5, atol=1e-6)
