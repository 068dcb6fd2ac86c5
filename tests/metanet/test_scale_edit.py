"""The function-preserving ``edit="scale"`` metanetwork: identity at start, same function, new ranking."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metaprune.errors import ConfigError
from metaprune.graph import to_graph
from metaprune.metanet.checkpoint import load_metanet, save_metanet
from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.loss import criterion_norms, dependency_groups
from metaprune.metanet.model import Metanet
from metaprune.metanet.transform import edit_params, transform_model
from metaprune.models import create_model
from metaprune.models import registry as model_registry


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    m = create_model("cifar_resnet20", num_classes=4, in_chans=1).train()
    g = to_graph(m)
    net = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=2, edit="scale", rho=1.0))
    return m, g, net


def _buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


def test_starts_at_identity():
    m, g, net = _setup()
    x, ea = net(g)
    assert torch.equal(x, g.x)
    assert all(torch.equal(ea[k], g.edges[k].attr) for k in g.edges)


def test_same_function_new_ranking(tmp_path):
    m, g, net = _setup()
    torch.nn.init.normal_(net.scale_dec[-1].weight, std=1.0)
    xb = torch.randn(16, 1, 28, 28)
    sd = m.state_dict()
    params = edit_params(net, g, _buffers(m))
    y0 = functional_call(m, {k: v.clone() for k, v in sd.items()}, (xb,))
    y1 = functional_call(m, params, (xb,))  # train-mode BN: batch statistics undo the scales
    assert torch.allclose(y0, y1, atol=1e-4)
    assert not torch.allclose(params["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    assert torch.equal(params["fc.weight"], sd["fc.weight"])  # no BatchNorm after the classifier
    assert torch.equal(params["layer1.0.bn1.weight"], sd["layer1.0.bn1.weight"])
    groups = dependency_groups(m, (1, 28, 28))
    before = criterion_norms(dict(sd), groups[-1]).argsort()
    after = criterion_norms({k: v.detach() for k, v in params.items()}, groups[-1]).argsort()
    assert not torch.equal(before, after)  # the L2 ranking the pruner uses has changed
    save_metanet(net, tmp_path / "mn")  # the config (edit="scale") travels with the weights
    net2, _ = load_metanet(tmp_path / "mn")
    assert net2.cfg.edit == "scale" and torch.equal(net2(g)[1]["k9"], net(g)[1]["k9"].detach())


def test_bad_edit_name():
    with pytest.raises(ConfigError):
        MetanetConfig(edit="nope")


def test_scale_edit_keeps_the_eval_function_with_or_without_recalibration():
    from metaprune.data import load_dataset

    data = load_dataset("synthetic", in_chans=1, image_size=28, num_classes=4)
    m, g, net = _setup()
    for mod in m.modules():  # trained-looking BN statistics, so a wrong rescaling would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.eval()
    torch.nn.init.normal_(net.scale_dec[-1].weight, std=1.0)
    x = torch.randn(16, 1, 28, 28)
    kept = transform_model(net, m, None)  # running statistics rescaled with the weights, not re-estimated
    with torch.no_grad():
        assert torch.allclose(kept(x), m(x), atol=1e-4)
        assert not torch.equal(kept.layer1[0].conv1.weight, m.layer1[0].conv1.weight)
    recal = transform_model(net, m, data.train, 4, batch_size=64)
    from metaprune.pruning import recalibrate_bn

    base = create_model("cifar_resnet20", num_classes=4, in_chans=1)
    base.load_state_dict(m.state_dict())
    recalibrate_bn(base, data.train, 4, 64, "cpu")
    with torch.no_grad():
        assert torch.allclose(recal.eval()(x), base.eval()(x), atol=1e-3)


def test_scale_edit_refuses_eval_mode_bn(tmp_path):
    from metaprune.metanet.config import MetaTrainConfig
    from metaprune.metanet.meta_train import meta_train

    with pytest.raises(ConfigError, match="bn-eval"):
        meta_train(tmp_path, None, tmp_path / "o", MetaTrainConfig(bn_eval=True), MetanetConfig(edit="scale"))
    with pytest.raises(ConfigError, match="bn-eval"):  # the default network is the scale edit
        meta_train(tmp_path, None, tmp_path / "o", MetaTrainConfig(bn_eval=True))


def test_configs_written_before_the_defaults_changed_load_as_written():
    """An edit checkpoint from before the `edit` option is the residual edit; a score network records the
    residual / 0.05 it always recorded (its checkpoints and resume fingerprints stay the same)."""
    old = {"hidden": 8, "layers": 1, "rho": 0.05, "output": "edit"}
    assert MetanetConfig.from_dict(old).edit == "residual"
    assert MetanetConfig.from_dict({**old, "edit": "scale", "rho": 1.0}).edit == "scale"
    score = MetanetConfig(hidden=8, layers=1, output="score")
    assert (score.edit, score.rho) == ("residual", 0.05)
    assert MetanetConfig(hidden=8, layers=1, output="score", edit="scale", rho=2.0) == score


def test_rho_default_follows_the_edit():
    assert MetanetConfig(edit="scale").rho == 1.0 and MetanetConfig(edit="residual").rho == 0.05


class _PreActBlock(torch.nn.Module):
    """Pre-activation basic block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``; with a 1x1 shortcut
    conv on the pre-activated input when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm2d(cin)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.shortcut = torch.nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(torch.relu(self.bn2(self.conv1(a)))) + sc


class _PreActNet(torch.nn.Module):
    """Stem conv (its output feeds block 1's bn1 *and* the identity shortcut), three pre-activation
    blocks (their bn1 read residual sums), a final BN on the last sum, pooling, a classifier."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_chans, 8, 3, 1, 1, bias=False)
        self.block1 = _PreActBlock(8, 8)
        self.block2 = _PreActBlock(8, 8)
        self.block3 = _PreActBlock(8, 12, stride=2)
        self.bn = torch.nn.BatchNorm2d(12)
        self.fc = torch.nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.relu(self.bn(x)).mean((2, 3)))


class _RandomLogScale(torch.nn.Module):
    """Stands in for the scale decoder: a fixed random pre-tanh log scale per node (untrained
    decoders give scales within 1e-3 of 1, too close to the identity to show a wrong rescaling)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("v", 3 * torch.randn(n, 1))

    def forward(self, h):
        return self.v


@pytest.fixture
def preact_arch(monkeypatch):
    """A tiny pre-activation ResNet registered for this test only (removed afterwards)."""
    name = "test_preact_resnet"
    monkeypatch.setitem(model_registry._REGISTRY, name, model_registry.ModelEntry(
        name, lambda num_classes=4, in_chans=1: _PreActNet(num_classes, in_chans), "test_preact", 16))
    return name


def test_scale_edit_is_function_preserving_on_pre_activation_blocks(preact_arch):
    """A BatchNorm that reads a residual sum (or a conv output a shortcut also reads) must not be
    rescaled: identity edges are not scaled, the BN statistics would be. Eval mode, no recalibration."""
    from metaprune.metanet.model import scalable_channels

    torch.manual_seed(0)
    m = create_model(preact_arch, num_classes=4, in_chans=1)
    for mod in m.modules():  # trained-looking statistics and affine parameters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.2)
    m.eval()
    g = to_graph(m)
    net = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=2, edit="scale", rho=1.0))
    net.scale_dec = _RandomLogScale(g.num_nodes)  # a random edit of every channel's scale (about 0.4 to 2.9)
    x = torch.randn(8, 1, 16, 16)
    edited = transform_model(net, m, None)  # running statistics rescaled with the weights, not re-estimated
    with torch.no_grad():
        y0, y1 = m(x), edited(x)
        assert (y1 - y0).abs().max().item() <= 1e-5 * max(1.0, y0.abs().max().item())
        # the edit did something where it is allowed: bn2 reads conv1's output alone
        for k in ("block1", "block2", "block3"):
            ratio = (edited.get_parameter(f"{k}.conv1.weight") / m.get_parameter(f"{k}.conv1.weight")).flatten(1)[:, 0]
            assert ratio.max() / ratio.min() > 1.5, k
        # and nothing where it is not: the stem feeds bn1 and the shortcut; bn1 / bn read sums
        assert torch.equal(edited.conv1.weight, m.conv1.weight)
        for k in ("block1.bn1", "block2.bn1", "block3.bn1", "bn"):
            for b in ("running_mean", "running_var"):
                assert torch.equal(edited.get_buffer(f"{k}.{b}"), m.get_buffer(f"{k}.{b}")), (k, b)
    # which channels qualify: exactly those of the three bn2 (conv1 outputs read by bn2 alone)
    ok = scalable_channels(g)
    starts = {e["key"].rsplit(".", 1)[0]: (e["start"], e["count"]) for e in g.spec["layout"]
              if e["kind"] == "node" and e["key"].endswith("running_mean")}
    expect = torch.zeros_like(ok)
    for k in ("block1.bn2", "block2.bn2", "block3.bn2"):
        s, c = starts[k]
        expect[s:s + c] = True
    assert torch.equal(ok, expect)


def test_scalable_channels_on_the_post_activation_resnet():
    """Every BN of a post-activation ResNet follows its conv alone: all of them stay scalable."""
    from metaprune.graph import NODE_SLOTS
    from metaprune.metanet.model import scalable_channels

    _, g, _ = _setup()
    assert torch.equal(scalable_channels(g), g.x_mask[:, NODE_SLOTS.index("bn_weight")])


def test_scale_edit_leaves_an_untraceable_architecture_unchanged():
    """Without the model's forward the graph cannot show whether a BN's input is also read elsewhere:
    no channel is rescaled then (and a warning says so)."""
    from metaprune.graph import Graph
    from metaprune.metanet import model as model_mod
    from metaprune.metanet.model import scalable_channels

    model_mod._KEEP_CACHE.clear()  # the warning is given once per architecture
    _, g, net = _setup()
    net.scale_dec = _RandomLogScale(g.num_nodes)
    g2 = Graph(g.x, g.x_mask, g.node_role, g.node_layer, g.node_depth, g.edges, {**g.spec, "arch": "not_registered"})
    with pytest.warns(UserWarning, match="cannot trace architecture 'not_registered'"):
        assert not scalable_channels(g2).any()
    x, ea = net(g2)
    assert torch.equal(x, g.x) and all(torch.equal(ea[k], g.edges[k].attr) for k in g.edges)
    assert not torch.equal(net(g)[1]["k9"], g.edges["k9"].attr)  # the same edit on the registered arch
