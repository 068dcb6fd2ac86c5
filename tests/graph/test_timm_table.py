"""timm layers through the converter: convert -> back onto a NaN-filled template -> every tensor
``torch.equal`` and the same outputs (``metaprune.graph.coverage.check_model``), one tiny model per
new rule (BatchNormAct2d, timm's LayerNorm2d / GroupNorm1 / Affine / Linear, a layer scale reshaped
from a parameter, the ViT ``Attention`` behind ``forward(x, attn_mask=None)``), and clear refusals.
The full list: ``tools/convert_coverage.py --timm`` (results/convert_coverage_timm.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph import to_graph
from metaprune.graph.coverage import check_model

timm = pytest.importorskip("timm")


def _stats(m: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so that a tensor mapped to the wrong slot shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
            for attr in ("weight", "bias", "alpha", "beta", "gamma", "scale"):
                p = getattr(mod, attr, None)
                if isinstance(p, nn.Parameter) and not isinstance(mod, (nn.Conv2d, nn.Linear)):
                    p.normal_()
    return m.eval()


class _Norms(nn.Module):
    """BatchNormAct2d (SiLU), GroupNorm1, LayerNorm2d, a channels-last Affine and a timm Linear."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d, GroupNorm1, LayerNorm2d
        from timm.layers.linear import Linear
        from timm.models.mlp_mixer import Affine

        self.c1, self.bn = nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU)
        self.c2, self.gn = nn.Conv2d(8, 6, 1), GroupNorm1(6)
        self.c3, self.ln = nn.Conv2d(6, 5, 1), LayerNorm2d(5)
        self.aff, self.fc = Affine(5), Linear(5, 4)

    def forward(self, x):
        x = self.ln(self.c3(self.gn(self.c2(self.bn(self.c1(x))))))
        return self.fc(self.aff(x.flatten(2).transpose(1, 2))).mean(1)


def _convnext():
    return timm.create_model("convnext_atto", pretrained=False, num_classes=4, depths=(1, 1, 1, 1),
                             dims=(8, 16, 24, 32))


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2,
                             num_classes=5, qkv_bias=True)


CASES = {
    "norms": (_Norms, (2, 3, 8, 8)),
    "mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4),
                              (2, 3, 32, 32)),
    "convnext_atto_reduced": (_convnext, (2, 3, 32, 32)),
    "vit_reduced": (_vit, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_timm_round_trip_exact(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    m = _stats(make())
    res = check_model(m, shape)
    assert res["status"] == "exact", res


def test_timm_encodings_hold_the_values():
    """The Affine's alpha is a diagonal (k1) edge per channel, its beta the bias slot; BatchNormAct2d's
    running mean sits in the BatchNorm slot of the conv's nodes."""
    from metaprune.graph.graph import SLOT

    torch.manual_seed(0)
    m = _stats(_Norms())
    g = to_graph(m, input_shape=(1, 3, 8, 8))
    aff = next(e["id"] for e in g.spec["layers"] if e["type"] == "Affine")
    k1 = g.edges["k1"]
    sel = k1.layer == aff
    assert torch.equal(k1.attr[sel, 0], m.aff.alpha.detach().flatten())
    dst = k1.index[1, sel]
    assert torch.equal(g.x[dst, SLOT["bias"]], m.aff.beta.detach().flatten())
    conv_nodes = torch.arange(3, 11)   # 3 input nodes, then conv c1's 8 outputs
    assert torch.equal(g.x[conv_nodes, SLOT["bn_mean"]], m.bn.running_mean)


def test_timm_vit_attention_heads_like_self_attention():
    torch.manual_seed(0)
    m = _stats(_vit())
    g = to_graph(m, input_shape=(1, 3, 16, 16))
    w = m.blocks[0].attn.qkv.weight.detach()
    qkv = g.edges["qkv3"].attr[:8 * 8].reshape(8, 8, 3)
    assert torch.equal(qkv.permute(2, 0, 1).reshape(24, 8), w)


def test_timm_refusals_name_the_module():
    from timm.layers import BatchNormAct2d

    m = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.PReLU), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(GraphError, match=r"^1 \(BatchNormAct2d\): its act \(PReLU\)"):
        to_graph(m, input_shape=(1, 3, 4, 4))
    from timm.models.vision_transformer import VisionTransformer

    v = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=5,
                          qk_norm=True).eval()
    with pytest.raises(GraphError, match=r"blocks\.0\.attn \(Attention\): normalises inside the attention"):
        to_graph(v, input_shape=(1, 3, 16, 16))


def test_partial_channel_slice_joined_to_its_channels():
    """ReXNet's ``cat([x[:, 0:k] + shortcut, x[:, k:]], 1)``: each part reads its own range of channels."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.cat([y[:, 0:3] + x, y[:, 3:]], dim=1))

    torch.manual_seed(0)
    m = M().eval()
    assert check_model(m, (2, 3, 4, 4))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 4, 4))
    slices = [e["id"] for e in g.spec["layers"] if e["type"] == "slice"]
    idx, lay = g.edges["id"].index, g.edges["id"].layer
    # conv a's 6 outputs are nodes 3..8: the first slice reads 3..5, the second 6..8
    assert [idx[0, lay == s].tolist() for s in slices] == [[3, 4, 5], [6, 7, 8]]


def test_timm_models_that_stay_refused_name_the_module():
    """ResMLP's cross-patch Linear mixes positions; a module branching on the input's shape cannot be traced."""
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    r = MlpMixer(num_classes=3, img_size=16, patch_size=8, num_blocks=1, embed_dim=8, mlp_ratio=2,
                 block_layer=ResBlock, norm_layer=Affine).eval()
    with pytest.raises(GraphError, match=r"blocks\.0\.linear_tokens \(Linear\): it mixes the 4 entries of the last "
                                         r"dim, which are positions"):
        to_graph(r, input_shape=(1, 3, 16, 16))

    class Branch(nn.Module):
        def forward(self, x):
            return x if x.shape[-1] > 2 else x * 2

    with pytest.raises(GraphError, match=r"cannot trace Sequential in module 1 \(Branch\)"):
        to_graph(nn.Sequential(nn.Conv2d(3, 4, 1), Branch()), input_shape=(1, 3, 4, 4))


def test_timm_vgg_conv_mlp_exact():
    """timm VGG's ConvMlp branches on the map size (an adaptive pool below its 5x5 kernel): a rule, not traced."""
    from timm.models.vgg import ConvMlp

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), ConvMlp(4, 6, kernel_size=5), nn.Flatten(), nn.Linear(6, 3)).eval()
    assert check_model(m, (2, 3, 4, 4))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 4, 4))
    assert torch.equal(g.edges["k25"].attr, m[1].fc1.weight.detach().reshape(-1, 25))
