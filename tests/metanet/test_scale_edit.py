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


def test_rho_default_follows_the_edit():
    assert MetanetConfig(edit="scale").rho == 1.0 and MetanetConfig().rho == 0.05
