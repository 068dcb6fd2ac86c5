"""What the tracer follows: only channel-preserving operations, merges by kind, live values, modules by type,
float64 and width-1 models (issue 12, items 3 and 11)."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from graph_helpers import assert_round_trips, input_for, randomise, small_model
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph import NODE_ROLES, Graph, from_graph, to_graph
from metaprune.models.cifar_resnet import BasicBlock, CifarResNet


def _same_graph(a: Graph, b: Graph) -> bool:
    """Bit-identical tensors and parameter layout (layer names may differ)."""
    if set(a.edges) != set(b.edges) or a.spec["layout"] != b.spec["layout"]:
        return False
    same = all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "x_mask", "node_role", "node_layer",
                                                                    "node_depth"))
    return same and all(torch.equal(getattr(a.edges[g], k), getattr(b.edges[g], k))
                        for g in a.edges for k in ("index", "attr", "role", "layer"))


class _Block(BasicBlock):
    """layer1.0 of a ResNet-20 with its own merge ``fn(out, identity)``."""

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.fn(out, x))


def _with_block(fn, extra: dict | None = None) -> nn.Module:
    model = small_model("cifar_resnet20").eval()
    old = model.layer1[0]
    blk = _Block(16, 16, 16)
    blk.load_state_dict(old.state_dict())
    blk.fn = fn
    for k, v in (extra or {}).items():
        setattr(blk, k, v)
    model.layer1[0] = blk
    return model


def _plain() -> nn.Module:
    return small_model("cifar_resnet20").eval()


# ---------------------------------------------------------------- 3(a) only channel-preserving ops
@pytest.mark.parametrize("fn,op", [
    (lambda a, b: a.flip(1) + b, "flip"),
    (lambda a, b: torch.flip(a, [1, 2]) + b, "flip"),
    (lambda a, b: torch.roll(a, 1, dims=1) + b, "roll"),
    (lambda a, b: a.softmax(1) + b, "softmax"),
    (lambda a, b: torch.nn.functional.max_pool1d(a.flatten(2).transpose(1, 2), 1).transpose(1, 2).reshape(a.shape)
     + b, "max_pool1d"),
    (lambda a, b: a.cumsum(1) + b, "cumsum"),
    (lambda a, b: a.sort(1)[0] + b, "sort"),
    (lambda a, b: torch.nn.functional.pad(a, (0, 0, 0, 0, 1, 0))[:, 1:] + b, "pad"),
])
def test_channel_reordering_functions_are_refused(fn, op):
    with pytest.raises(GraphError, match=op) as e:
        to_graph(_with_block(fn), cache=False)
    assert "(" in str(e.value) and "\n" not in str(e.value)  # names the fx node, one line


def test_channel_shuffle_module_is_refused_with_its_path():
    model = _with_block(lambda a, b: a + b)
    blk = model.layer1[0]
    blk.shuffle = nn.ChannelShuffle(4)
    blk.fn = lambda a, b, s=blk: s.shuffle(a) + b
    with pytest.raises(GraphError, match=r"layer1\.0\.shuffle \(ChannelShuffle\)"):
        to_graph(model, cache=False)


@pytest.mark.parametrize("fn", [
    lambda a, b: a.flip(2, 3) + b,
    lambda a, b: torch.roll(a, (1, 2), dims=(2, 3)) + b,
    lambda a, b: torch.nn.functional.max_pool2d(a, 3, 1, 1) + b,
    lambda a, b: torch.sigmoid(a) * 2 - 1 + b,
    lambda a, b: a.permute(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1]).transpose(1, 2).reshape(a.shape) + b,
    lambda a, b: nn.functional.dropout(a, 0.1, training=False) + b,
    lambda a, b: nn.functional.interpolate(nn.functional.avg_pool2d(a, 2), scale_factor=2.0) + b,
    lambda a, b: nn.functional.pad(a, (1, 1, 1, 1))[..., 1:-1, 1:-1] + b,
    lambda a, b: a.unsqueeze(0).squeeze(0).flatten(2).unflatten(2, a.shape[2:]) + b,
])
def test_channel_preserving_ops_keep_the_graph(fn):
    assert _same_graph(to_graph(_with_block(fn), cache=False), to_graph(_plain(), cache=False))


# ---------------------------------------------------------------- 3(b) merge kinds
def test_sum_difference_product_give_different_graphs():
    graphs = {name: to_graph(_with_block(fn), cache=False) for name, fn in [
        ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("rsub", lambda a, b: b - a),
        ("mul", lambda a, b: a * b), ("torch.sub", torch.sub), ("torch.mul", torch.mul)]}
    assert _same_graph(graphs["add"], to_graph(_plain(), cache=False))
    assert _same_graph(graphs["sub"], graphs["torch.sub"]) and _same_graph(graphs["mul"], graphs["torch.mul"])
    names = ["add", "sub", "rsub", "mul"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not _same_graph(graphs[a], graphs[b]), (a, b)
    lid = next(lay["id"] for lay in graphs["sub"].spec["layers"] if lay["type"] == "difference")
    nodes = torch.nonzero(graphs["sub"].node_layer == lid).flatten()
    assert (graphs["sub"].node_role[nodes] == NODE_ROLES.index("difference")).all() and len(nodes) == 16
    ident = graphs["sub"].edges["id"]
    into = torch.isin(ident.index[1], nodes)
    # out (the conv branch) enters with +1, the subtracted shortcut with -1; b - a the other way round
    assert sorted(ident.attr[into, 0].tolist()) == [-1.0] * 16 + [1.0] * 16
    conv2 = set(torch.nonzero(graphs["sub"].node_layer == next(
        lay["id"] for lay in graphs["sub"].spec["layers"] if lay["name"] == "layer1.0.conv2")).flatten().tolist())
    from_conv = torch.tensor([int(s) in conv2 for s in ident.index[0, into]])
    assert (ident.attr[into][from_conv, 0] == 1).all() and (ident.attr[into][~from_conv, 0] == -1).all()
    mul = graphs["mul"]
    assert int((mul.node_role == NODE_ROLES.index("product")).sum()) == 16


class _SE(nn.Module):
    def __init__(self, c: int, merge):
        super().__init__()
        self.fc1, self.fc2, self.merge = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), merge

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.merge(x, s)


def test_squeeze_excitation_gate_is_a_product_not_a_residual():
    def with_se(merge):
        model = _with_block(lambda a, b: a + b)
        blk = model.layer1[0]
        blk.se = _SE(16, merge)
        blk.fn = lambda a, b, s=blk: s.se(a) + b
        return model

    gate, add = to_graph(with_se(lambda x, s: x * s), cache=False), to_graph(with_se(lambda x, s: x + s), cache=False)
    assert int((gate.node_role == NODE_ROLES.index("product")).sum()) == 16
    assert int((add.node_role == NODE_ROLES.index("product")).sum()) == 0
    assert not _same_graph(gate, add)


@pytest.mark.parametrize("fn,match", [
    (lambda a, b: a / b, "divides"),
    (lambda a, b: torch.div(a, b), "divides"),
    (lambda a, b: a * a.mean(1, keepdim=True) + b, "holds no channels"),          # channel-mixing gate
    (lambda a, b: a * a[:, :1] + b, r"broadcasts tensors with \[16, 1\] channels"),  # one channel sliced, broadcast
    (lambda a, b: a + torch.ones_like(a) + b, "ones_like"),                        # a constant
    (lambda a, b: a * a.new_ones(a.shape) + b, "new_ones"),
    (lambda a, b: torch.add(a, b, alpha=2), "alpha"),
])
def test_merges_that_cannot_be_represented_are_refused(fn, match):
    with pytest.raises(GraphError, match=match):
        to_graph(_with_block(fn), cache=False)


def test_channel_broadcast_product_is_refused():
    model = _with_block(lambda a, b: a + b, {"att": nn.Conv2d(16, 1, 1)})  # a one-channel spatial attention map
    model.layer1[0].fn = lambda a, b, s=model.layer1[0]: a * torch.sigmoid(s.att(a)) + b
    with pytest.raises(GraphError, match=r"broadcasts tensors with \[16, 1\] channels"):
        to_graph(model, cache=False)


def test_in_place_change_of_a_value_read_later_is_refused():
    def keep_alias(a, b):
        c = a
        a.add_(b)         # changes c too: c + a is 2 (a + b), not (a + b) + a
        return c + a

    with pytest.raises(GraphError, match="in-place"):
        to_graph(_with_block(keep_alias), cache=False)

    def unused_result(a, b):
        a.mul_(b)
        return a + b

    with pytest.raises(GraphError, match="in-place"):
        to_graph(_with_block(unused_result), cache=False)

    def overwrite(a, b):
        a.copy_(b)        # a now holds the shortcut's channels
        return a + b

    with pytest.raises(GraphError, match="in-place operation 'copy_'"):
        to_graph(_with_block(overwrite), cache=False)
    # in-place activations change values, not which channel is where
    assert _same_graph(to_graph(_with_block(lambda a, b: (a.relu_(), a + b)[1]), cache=False),
                       to_graph(_plain(), cache=False))


# ---------------------------------------------------------------- 3(c) unused values
def test_unused_values_create_no_nodes():
    def dead(a, b):
        _ = a + b, a * b, torch.cat([a, b], 1), a.flip(1)   # computed, never used
        return a + b

    assert _same_graph(to_graph(_with_block(dead), cache=False), to_graph(_plain(), cache=False))


def test_unused_layer_with_parameters_is_refused():
    model = _with_block(lambda a, b: a + b, {"aux": nn.Conv2d(16, 3, 1)})
    model.layer1[0].fn = lambda a, b, s=model.layer1[0]: (s.aux(a), a + b)[1]
    with pytest.raises(GraphError, match=r"layer1\.0\.aux\.weight.*does not reach the output"):
        to_graph(model, cache=False)


# ---------------------------------------------------------------- 3(d) modules by type, not by name
class _Named(CifarResNet):
    """ResNet-20 whose head goes through parameter-free modules with misleading names."""

    def __init__(self, names: dict[str, nn.Module]):
        super().__init__(20, num_classes=7)
        for k, v in names.items():
            setattr(self, k, v)
        self.order = list(names)
        self.metaprune_arch = {"arch": "cifar_resnet20", "args": {"num_classes": 7, "in_chans": 3}}

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        x = self.avgpool(x)
        for k in self.order:
            x = getattr(self, k)(x)
        return self.fc(x if "flat" in self.order else torch.flatten(x, 1))


def _reference(model: nn.Module) -> Graph:
    plain = CifarResNet(20, num_classes=7)
    plain.load_state_dict(model.state_dict())
    plain.metaprune_arch = model.metaprune_arch
    return to_graph(plain.eval(), cache=False)


def test_flatten_named_flat_and_identity_named_mean_convert():
    model = randomise(_Named({"mean": nn.Identity(), "flat": nn.Flatten(1), "view": nn.Dropout(0.1)})).eval()
    g = to_graph(model, cache=False)
    assert _same_graph(g, _reference(model))
    back = from_graph(g)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


class _FlippingReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x).flip(1)


def test_subclass_of_an_allowed_module_with_its_own_forward_is_traced():
    with pytest.raises(GraphError, match="flip"):
        to_graph(_Named({"act": _FlippingReLU()}), cache=False)


class _FlippingConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x.flip(1))


def test_subclass_of_a_layer_with_its_own_forward_is_not_taken_for_the_layer():
    model = _with_block(lambda a, b: a + b)
    old = model.layer1[0].conv2
    model.layer1[0].conv2 = _FlippingConv(16, 16, 3, 1, 1, bias=False)
    model.layer1[0].conv2.load_state_dict(old.state_dict())
    with pytest.raises(GraphError, match="flip"):
        to_graph(model, cache=False)


def test_channel_shuffle_named_like_an_allowed_op_is_refused():
    with pytest.raises(GraphError, match=r"flatten \(ChannelShuffle\)"):
        to_graph(_Named({"flatten": nn.ChannelShuffle(4)}), cache=False)


# ---------------------------------------------------------------- 3(e) float64
@pytest.mark.parametrize("name", ["cifar_resnet20", "vit_tiny_p4"])
def test_float64_model_round_trips_exactly(name, tmp_path):
    model = small_model(name).double()
    with torch.no_grad():  # values a float32 graph cannot hold
        for p in model.parameters():
            p.add_(torch.full_like(p, 1e-12))
    g = to_graph(model)
    back = from_graph(Graph.load(g.save(tmp_path / "g64.safetensors")))
    assert all(torch.equal(a, b) and a.dtype == b.dtype
               for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert g.x.dtype == torch.float64 and all(e.attr.dtype == torch.float64 for e in g.edges.values())
    assert_round_trips(model, input_for(model, batch=2).double())  # eval and train mode, outputs too


# ---------------------------------------------------------------- 11: width-1 models
def _prune_to_width_one(model: nn.Module) -> nn.Module:
    """Every DepGraph group but the classifier's keeps exactly one channel."""
    x = input_for(model, batch=1)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    for grp in list(dg.get_all_groups(ignored_layers=[last], root_module_types=[nn.Conv2d, nn.Linear])):
        dep = grp[0].dep
        mod = dep.target.module
        n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        pg = dg.get_pruning_group(mod, dep.handler, list(range(1, n)))
        if dg.check_pruning_group(pg):
            pg.prune()
    return model


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_vgg11_bn"])
def test_width_one_model_round_trips(name):
    model = _prune_to_width_one(small_model(name))
    widths = {getattr(m, "out_channels", None) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert widths == {1}, widths
    randomise(model, seed=4)
    assert_round_trips(model, input_for(model, batch=2))


class _HardSwishByHand(nn.Module):
    def forward(self, x):
        return x * torch.clamp(x + 3, 0, 6) / 6


def test_registered_channel_op_becomes_a_leaf():
    from metaprune.graph import register_channel_op
    from metaprune.graph.ops import MODULE_KINDS

    def model():
        return _with_block(lambda a, b: a + b, {"act": _HardSwishByHand()})

    def graph():
        m = model()
        m.layer1[0].fn = lambda a, b, s=m.layer1[0]: s.act(a) + b
        return to_graph(m, cache=False)

    traced = graph()  # traced through: x * f(x) is a channel-wise product of the same channels
    assert int((traced.node_role == NODE_ROLES.index("product")).sum()) == 16
    register_channel_op(_HardSwishByHand, "elementwise")
    try:
        assert _same_graph(graph(), to_graph(_plain(), cache=False))
    finally:
        del MODULE_KINDS[_HardSwishByHand]
    with pytest.raises(ValueError, match="unknown kind"):
        register_channel_op(_HardSwishByHand, "shuffle")


def test_metanetwork_edits_a_float64_model():
    from metaprune.metanet import transform_model
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet

    model = small_model("cifar_resnet20").double().eval()
    net = Metanet.for_graph(to_graph(small_model("cifar_resnet20")), MetanetConfig(hidden=8, layers=1, edit="residual"))
    out = transform_model(net, model)
    assert all(p.dtype == torch.float64 for p in out.parameters())
    assert torch.isfinite(out(input_for(model, batch=1).double())).all()
