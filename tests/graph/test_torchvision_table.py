"""Converter coverage over every torchvision classification builder: convert -> back -> exact
(every tensor ``torch.equal`` onto a NaN-filled template, same outputs) or one clear GraphError
naming the module. Small builders run in the default suite; the rest are ``slow``; builders whose
graph would not fit this machine's memory run with their repeated blocks cut to two per stage
(``tools/convert_coverage.py`` writes the full table)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph import Graph, from_graph, to_graph
from metaprune.graph.coverage import check_builder, check_model, list_builders, num_params

#: builders the converter refuses, and what the message must say
REFUSED = {
    "swin_": "features.1.0.attn",     # shifted-window attention (functional, relative position bias / MLP)
    "maxvit_t": "RelativePositionalMultiHeadAttention",
}
#: in the default suite (fast: about 1 s each on one core); every other builder is slow
FAST = {"alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "maxvit_t",
        "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
        "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t"}
#: a graph costs ~36 bytes per weight of a linear layer: beyond this many parameters depth is reduced
MAX_PARAMS = int(float(os.environ.get("METAPRUNE_COVERAGE_MAX_PARAMS", 150e6)))


def _expected(name: str) -> str | None:
    return next((v for k, v in REFUSED.items() if name.startswith(k)), None)


def _params():
    out = []
    for name in list_builders():
        marks = [] if name in FAST else [pytest.mark.slow]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_torchvision_builder_round_trip(name):
    # beyond MAX_PARAMS the graph does not fit this machine: the repeated blocks are cut to two per stage
    res = check_builder(name, reduce=name not in FAST and num_params(name) > MAX_PARAMS)
    want = _expected(name)
    if want is None:
        assert res["status"] == "exact", res
    else:
        assert res["status"] == "refused", res
        assert want in res["detail"], res


def test_fast_set_covers_every_family():
    """Each family has a builder in the default suite, or a reduced configuration below (VGG: the flatten
    into a Linear of AlexNet and test_flatten_feature_map_into_linear...; ViT: the reduced ViT)."""
    names = set(list_builders())
    assert FAST <= names
    family = {n: n.split("_")[0].rstrip("0123456789") for n in names}
    assert {family[n] for n in names} - {family[n] for n in FAST} == {"vgg", "vit", "wide"}


# ----------------------------------------------------------------- reduced configurations (default suite)
def test_reduced_torchvision_vit_multihead_attention_exact():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                          num_classes=5).eval()
    assert check_model(m, (2, 3, 16, 16))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 16, 16))
    # the attention is encoded as SelfAttention is: q/k/v weights as 3-feature edges, biases in slots 7-9
    w = m.encoder.layers[0].self_attention.in_proj_weight
    qkv = g.edges["qkv3"].attr[:8 * 8].reshape(8, 8, 3)
    assert torch.equal(qkv.permute(2, 0, 1).reshape(24, 8), w.detach())


def test_reduced_convnext_layernorm2d_and_layer_scale_exact():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4).eval()
    with torch.no_grad():
        for blk in (m.features[1][0], m.features[3][0]):
            blk.layer_scale.normal_()
    assert check_model(m, (2, 3, 32, 32))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 32, 32))
    gamma = m.features[1][0].layer_scale.detach().flatten()
    scale_layer = next(e["id"] for e in g.spec["layers"] if e["type"] == "layer_scale")
    k1 = g.edges["k1"]
    sel = k1.layer == scale_layer
    assert torch.equal(k1.attr[sel, 0], gamma)
    assert int(sel.sum()) == 8 and len(set((k1.index[1, sel] - k1.index[0, sel]).tolist())) == 1   # diagonal


def test_flatten_feature_map_into_linear_is_a_spatial_kernel():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(),
                      nn.Linear(36, 5)).eval()
    assert check_model(m, (2, 3, 8, 8))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 8, 8))
    # one edge per (channel, output) with the 3x3 positions as features, like a 3x3 conv
    assert torch.equal(g.edges["k9"].attr[-20:], m[5].weight.detach().reshape(5, 4, 9).reshape(20, 9))


def test_chunk_along_channels_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x1, x2, x3 = self.a(x).chunk(3, dim=1)
            p, q = torch.split(x3, 1, dim=1)
            return self.c(torch.cat([x1, self.b(torch.cat([q, p], 1)), x2], 1))

    torch.manual_seed(0)
    m = M().eval()
    assert check_model(m, (2, 3, 5, 5))["status"] == "exact"
    # the parts are joined to the right channels: swapping p and q must give another graph
    g = to_graph(m, input_shape=(1, 3, 5, 5))
    src = g.edges["id"].index[0]
    assert src[:6].tolist() == list(range(3, 9))   # the 3 chunks read channels 0..5 of conv a (nodes 3..8)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_encoded_as_permutation(groups):
    from torchvision.models.shufflenetv2 import channel_shuffle

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(channel_shuffle(self.a(x), groups))

    torch.manual_seed(0)
    m = M().eval()
    assert check_model(m, (2, 3, 4, 4))["status"] == "exact"
    g = to_graph(m, input_shape=(1, 3, 4, 4))
    # output channel o of the shuffle reads channel perm[o] of conv a (nodes 3..8), as channel_shuffle does
    perm = channel_shuffle(torch.arange(6.0).view(1, 6, 1, 1), groups).flatten().long()
    assert not torch.equal(perm, torch.arange(6))
    idx = g.edges["id"].index
    assert torch.equal(idx[0] - 3, perm) and torch.equal(idx[1], torch.arange(9, 15)), idx


def test_new_encodings_survive_the_graph_file(tmp_path):
    """Permutation edges, layer scale, flatten->Linear and attention graphs are valid files that load back exactly."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    torch.manual_seed(0)
    for m, size in [(ShuffleNetV2([1, 1, 1], [8, 12, 24, 48, 64], num_classes=3), 32),
                    (ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3), 16)]:
        m.eval()
        g = to_graph(m, input_shape=(1, 3, size, size))
        g.save(tmp_path / "g.safetensors")
        back = from_graph(Graph.load(tmp_path / "g.safetensors"), template=m)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
        x = torch.randn(2, 3, size, size)
        assert torch.equal(m(x), back(x))


def test_channels_split_and_not_joined_refused_naming_module():
    class Heads(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], 2, 3, x.shape[2], x.shape[3]).mean(1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.h, self.b = nn.Conv2d(3, 6, 1), Heads(), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.b(self.h(self.a(x)))

    with pytest.raises(GraphError, match="in module h .*split over several dims"):
        to_graph(M(), input_shape=(1, 3, 4, 4))


def test_cross_attention_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            x = x.flatten(2).transpose(1, 2)
            q, kv = self.q(x), self.kv(x)
            return self.att(q, kv, kv, need_weights=False)[0]

    with pytest.raises(GraphError, match="att .*MultiheadAttention.*besides its input"):
        to_graph(M(), input_shape=(1, 4, 3, 3))


def test_groupnorm_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 2, 1)).eval()
    with torch.no_grad():
        m[1].weight.normal_()
        m[1].bias.normal_()
    assert check_model(m, (2, 3, 6, 6))["status"] == "exact"


# ----------------------------------------------------------------- template API and its errors
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_to_graph_without_spec_needs_input_shape():
    with pytest.raises(GraphError, match="input_shape"):
        to_graph(_tiny())
    for bad in [(3, -1), (1, 3.5, 4, 4), "1x3", (True, 3, 4, 4), (4,)]:
        with pytest.raises(GraphError, match="input_shape must be"):
            to_graph(_tiny(), input_shape=bad)
    with torch.device("meta"):
        meta = _tiny()
    with pytest.raises(GraphError, match="meta device"):
        to_graph(meta, input_shape=(1, 3, 5, 5))


def test_from_graph_without_template_refused(tmp_path):
    g = to_graph(_tiny(), input_shape=(1, 3, 5, 5))
    with pytest.raises(GraphError, match="template"):
        from_graph(g)
    g.save(tmp_path / "g.safetensors")   # the graph file of a spec-less module loads and rebuilds onto a template
    back = from_graph(Graph.load(tmp_path / "g.safetensors"), template=_tiny())
    assert all(torch.equal(a, b) for a, b in zip(_tiny().state_dict().values(), back.state_dict().values()))


def test_from_graph_template_mismatch_refused():
    g = to_graph(_tiny(), input_shape=(1, 3, 5, 5))
    wrong = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with pytest.raises(GraphError, match="same widths"):
        from_graph(g, template=wrong)
    with pytest.raises(GraphError, match="does not fit"):
        from_graph(g, template=nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(GraphError, match="same widths and dtype"):
        from_graph(g, template=_tiny().double())


def test_template_is_not_changed_and_result_is_a_copy():
    m, t = _tiny(), _tiny()
    with torch.no_grad():
        for p in t.parameters():
            p.zero_()
    back = from_graph(to_graph(m, input_shape=(1, 3, 5, 5)), template=t)
    assert back is not t and all(torch.equal(p, torch.zeros_like(p)) for p in t.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_registered_model_with_input_shape_still_rebuilds_from_spec():
    from metaprune.models import create_model

    m = create_model("cifar_resnet20", 10, 3)
    g = to_graph(m, input_shape=(1, 3, 16, 16))
    assert g.spec["arch"] == "cifar_resnet20" and g.spec["input_shape"] == [1, 3, 16, 16]
    back = from_graph(g)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_reduce_depth_keeps_widths_and_layer_types():
    from metaprune.graph.coverage import build, builder_config, reduce_depth

    m = build(builder_config("resnet50"))
    types = {type(x) for x in m.modules()}
    assert reduce_depth(m) == (3 + 4 + 6 + 3) - 4 * 2
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == [2, 2, 2, 2]
    assert {type(x) for x in m.modules()} == types
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_spec_less_models_are_not_served_from_the_structure_cache():
    """Two modules with the same names and shapes whose forward differs (a flag) must get their own graphs."""
    class M(nn.Module):
        def __init__(self, residual):
            super().__init__()
            self.a, self.residual = nn.Conv2d(3, 3, 1), residual

        def forward(self, x):
            return self.a(x) + x if self.residual else self.a(x)

    g1 = to_graph(M(True), input_shape=(1, 3, 4, 4))
    g2 = to_graph(M(False), input_shape=(1, 3, 4, 4))
    assert "id" in g1.edges and "id" not in g2.edges
