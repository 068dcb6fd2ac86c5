"""Ranking (score) metanetwork: learns a planted ranking, checkpoint round trip, the ``metanet`` pruning
criterion prunes what the scores say, clear errors, the gate-target cache's fingerprint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from metaprune.errors import ConfigError, ModelFileError
from metaprune.graph import NODE_SLOTS, to_graph
from metaprune.metanet.checkpoint import load_metanet, save_metanet
from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.model import Metanet
from metaprune.metanet.rank import (
    RankMember,
    RankTrainConfig,
    group_nodes,
    group_scores,
    keep_overlap,
    pairwise_keep_loss,
    predict_scores,
    rank_train,
    spearman,
)
from metaprune.models import create_model
from metaprune.pruning import PruneConfig, prune


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = create_model("cifar_resnet20", num_classes=4, in_chans=1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 1.0)
            mod.running_var.data.uniform_(0.5, 2.0)
    return m.eval()


def _planted(seed: int) -> RankMember:
    """A member whose target ranks each group's channels by their mean BatchNorm bias (not by magnitude)."""
    m = _model(seed)
    g = to_graph(m)
    groups = [x for x in group_nodes(m, g) if x.fallback is None]
    bias = g.x[:, NODE_SLOTS.index("bn_bias")].float()
    targets = group_scores(bias, groups)
    return RankMember(path=f"planted{seed}", graph=g, groups=groups, targets=targets, baselines={})


def _score_net(g, seed=0):
    torch.manual_seed(seed)
    return Metanet.for_graph(g, MetanetConfig(hidden=16, layers=1, output="score"))


def test_learns_a_planted_ranking_that_transfers(tmp_path):
    train, held = [_planted(0), _planted(1)], _planted(2)
    torch.manual_seed(0)
    before = Metanet.for_graph(held.graph, MetanetConfig(hidden=16, layers=1, output="score"))
    rho0 = spearman(group_scores(before(held.graph).detach(), held.groups), held.targets)
    s = rank_train(train, [], tmp_path / "r", RankTrainConfig(steps=40, lr=1e-2, log_every=1000, save_every=1000),
                   MetanetConfig(hidden=16, layers=1), log=lambda m: None)
    net, meta = load_metanet(tmp_path / "r")
    assert net.cfg.output == "score" and meta["summary"]["steps"] == 40
    rho = spearman(group_scores(net(held.graph).detach(), held.groups), held.targets)
    assert rho > 0.6 and rho > rho0 + 0.3, (rho0, rho)
    assert s["train_seconds"] > 0


def test_score_checkpoint_round_trip_and_edit_checkpoint_unchanged(tmp_path):
    m = _model()
    g = to_graph(m)
    net = _score_net(g)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_metanet(net, tmp_path / "s")
    net2, meta = load_metanet(tmp_path / "s")
    assert meta["metanet"]["output"] == "score"
    with torch.no_grad():
        assert torch.equal(net(g), net2(g))
    # an edit metanetwork written without the `output` field loads as an edit network, as before
    edit = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=1, edit="residual"))
    save_metanet(edit, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    del cfg["metanet"]["output"]
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    e2, _ = load_metanet(tmp_path / "e")
    assert e2.cfg.output == "edit"
    with torch.no_grad():
        x1, _ = edit(g)
        x2, _ = e2(g)
    assert torch.equal(x1, x2)


def test_metanet_criterion_prunes_the_lowest_scored_channels(tmp_path):
    m = _model()
    g = to_graph(m)
    net = _score_net(g)
    with torch.no_grad():  # a non-trivial ranking, unlike any magnitude criterion
        net.score_prior.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
        net.score_dec[-1].weight.normal_(0, 1.0)
    save_metanet(net, tmp_path / "s")
    scores, _ = predict_scores(net, m)
    with torch.no_grad():  # a single-layer group's scores are its layer's node scores, channel by channel
        node = net(g)
    lid = next(e["id"] for e in g.spec["layers"] if e["name"] == "layer2.1.conv1")
    grp = next(x for x in group_nodes(m, g) if x.key == "layer2.1.conv1:out")
    assert torch.allclose(scores["layer2.1.conv1:out"], node[g.node_layer == lid] - grp.functional, atol=1e-5)
    res = prune(m, PruneConfig(ratio=0.5, criterion="metanet", metanet=str(tmp_path / "s"), round_to=1))
    assert res.info["metanet"]["seconds"] > 0 and res.info["metanet"]["groups"] == len(scores)
    for name, mod in (("layer2.1.conv1:out", "bn1"), ("layer1.2.conv1:out", "bn1")):
        kept = getattr(res.model.get_submodule(name.split(".conv")[0]), mod).weight  # the group's BatchNorm
        want = torch.topk(scores[name], kept.shape[0]).indices.sort().values
        assert torch.equal(kept, getattr(m.get_submodule(name.split(".conv")[0]), mod).weight[want])
    l2 = prune(m, PruneConfig(ratio=0.5, round_to=1)).model.layer2[1].bn1.weight
    assert not torch.equal(l2, res.model.layer2[1].bn1.weight)  # the scores, not magnitude, chose


def test_metanet_criterion_errors(tmp_path, capsys):
    m = _model()
    edit = Metanet.for_graph(to_graph(m), MetanetConfig(hidden=8, layers=1, edit="residual"))
    save_metanet(edit, tmp_path / "edit")
    with pytest.raises(ModelFileError, match="outputs weight edits"):
        prune(m, PruneConfig(ratio=0.5, criterion="metanet", metanet=str(tmp_path / "edit")))
    with pytest.raises(ModelFileError, match="does not exist"):
        prune(m, PruneConfig(ratio=0.5, criterion="metanet", metanet=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="needs a score metanetwork"):
        PruneConfig(ratio=0.5, criterion="metanet")
    from metaprune.cli import main
    from metaprune.io import save_model

    save_model(m, tmp_path / "m.safetensors")
    rc = main(["prune", str(tmp_path / "m.safetensors"), "--ratio", "0.5", "--criterion", "metanet", "--metanet",
               str(tmp_path / "edit"), "-o", str(tmp_path / "out"), "--no-latency", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "outputs weight edits" in err and "Traceback" not in err


def test_gate_target_cache_is_keyed_by_fingerprint(tmp_path, monkeypatch):
    from metaprune.fingerprint import fingerprint
    from metaprune.io import save_model
    from metaprune.metanet import targets

    zoo = tmp_path / "zoo"
    (zoo / "member_000").mkdir(parents=True)
    (zoo / "zoo.json").write_text(json.dumps({"config": {"data": "fashion-mnist", "val_fraction": 0.1,
                                                         "data_seed": 1, "train_subset": 100}}))
    member = zoo / "member_000"
    save_model(_model(), member / "model.safetensors")
    cache = tmp_path / "cache"
    st, js = targets.cache_paths(cache, member, 3.0)
    st.parent.mkdir(parents=True)
    save_file({"conv1:out": torch.arange(16.0)}, str(st))
    ident = targets.target_fingerprint(member, 3.0)
    js.write_text(json.dumps({"fingerprint": fingerprint(ident), "identity": ident}))
    hit = targets.load_cached(cache, member, 3.0)
    assert hit is not None and torch.equal(hit["conv1:out"], torch.arange(16.0))
    assert targets.cache_paths(cache, member, 3.0, seed=1)[0] != st  # one entry per seed
    assert targets.load_cached(cache, member, 3.0, seed=1) is None  # other gate settings
    real = targets.gate_source_sha256()
    monkeypatch.setattr(targets, "gate_source_sha256", lambda: "0" * 64)  # gate.py changed
    assert targets.load_cached(cache, member, 3.0) is None
    assert targets.load_cached(cache, member, 3.0, accept_gate_sha=(real[:8],)) is not None  # named explicitly
    assert targets.load_cached(cache, member, 3.0, accept_gate_sha=("f" * 8,)) is None
    monkeypatch.undo()
    save_model(_model(seed=5), member / "model.safetensors")  # another member file
    assert targets.load_cached(cache, member, 3.0) is None


def test_rank_train_resumes_exactly_and_refuses_another_run(tmp_path):
    train = [_planted(0), _planted(1)]
    cfg = dict(steps=6, lr=1e-2, log_every=3, save_every=1, average_from=0.5)
    ncfg = dict(hidden=8, layers=1)
    rank_train(train, [], tmp_path / "a", RankTrainConfig(**cfg), MetanetConfig(**ncfg), log=lambda m: None)

    def crash(msg):
        if '"step": 3' in msg:
            raise KeyboardInterrupt  # interrupted after step 3's update, before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        rank_train(train, [], tmp_path / "b", RankTrainConfig(**cfg), MetanetConfig(**ncfg), log=crash)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 2
    lines = []
    rank_train(train, [], tmp_path / "b", RankTrainConfig(**cfg), MetanetConfig(**ncfg), log=lines.append)
    assert lines[0] == "resumed at step 2"
    a, _ = load_metanet(tmp_path / "a")
    b, _ = load_metanet(tmp_path / "b")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(ConfigError, match="differ|another"):
        rank_train(train, [], tmp_path / "b", RankTrainConfig(**{**cfg, "tau": 2.0}), MetanetConfig(**ncfg),
                   log=lambda m: None)


def test_meta_train_score_cli_needs_up_to_date_targets(tmp_path, capsys):
    from metaprune.cli import main
    from metaprune.io import save_model

    zoo = tmp_path / "zoo"
    (zoo / "member_000").mkdir(parents=True)
    (zoo / "zoo.json").write_text(json.dumps({"config": {"data": "fashion-mnist", "val_fraction": 0.1,
                                                         "data_seed": 1, "train_subset": 100}}))
    save_model(_model(), zoo / "member_000" / "model.safetensors")
    rc = main(["meta-train", "--output-mode", "score", "--zoo", str(zoo), "--targets", str(tmp_path / "cache"),
               "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "no up-to-date gate target" in err
    assert not (tmp_path / "out" / "metanet.safetensors").exists()
    rc = main(["meta-train", "--output-mode", "score", "--zoo", str(zoo), "--members", str(zoo / "member_007"),
               "--targets", str(tmp_path / "cache"), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "member_007" in err and "not finished members" in err


def test_untrained_score_metanet_ranks_like_functional_also_in_residual_groups():
    """The score head starts at the functional criterion, residual streams (several convs) included."""
    from metaprune.pruning.criteria import FunctionalImportance
    from metaprune.pruning.gate import make_pruner

    m = _model()
    scores, _ = predict_scores(_score_net(to_graph(m)), m)
    pruner = make_pruner(m, PruneConfig(ratio=0.5), torch.randn(1, 1, 32, 32))
    names = {mod: n for n, mod in m.named_modules()}
    checked = 0
    for grp in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        key = f"{names[grp[0].dep.target.module]}:out"
        if key in ("conv1:out", "layer2.0.downsample.0:out", "layer1.0.conv1:out"):
            want = FunctionalImportance()(grp)
            assert torch.equal(torch.argsort(scores[key]), torch.argsort(want)), key
            checked += 1
    assert checked == 3


def test_load_rank_member_baselines_are_the_groups_l2_and_functional(tmp_path):
    """A member's l2 / functional baselines are torch-pruning's group importances of the very groups the
    targets are keyed by (the group lookup shares `pruning_groups` with `group_nodes`)."""
    import torch_pruning as tp

    from metaprune.io import save_model
    from metaprune.metanet.rank import load_rank_member
    from metaprune.pruning.criteria import FunctionalImportance
    from metaprune.pruning.gate import make_pruner, pruning_groups

    m = _model(3)
    save_model(m, tmp_path / "model.safetensors", extra={})
    (tmp_path / "metrics.json").write_text("{}")
    g = to_graph(m)
    targets = {x.key: torch.rand(x.n_root) for x in group_nodes(m, g)}
    member = load_rank_member(tmp_path, targets)
    pruner = make_pruner(m, PruneConfig(ratio=0.5), torch.randn(1, 1, 32, 32))
    groups = {key: grp for grp, key, _, _ in pruning_groups(pruner, {mod: n for n, mod in m.named_modules()})}
    assert len(member.groups) > 5
    for x, l2, fn in zip(member.groups, member.baselines["l2"], member.baselines["functional"]):
        assert torch.allclose(l2, tp.importance.GroupMagnitudeImportance(p=2)(groups[x.key]).float())
        assert torch.allclose(fn, FunctionalImportance()(groups[x.key]).float())


def test_pairwise_keep_loss_values_and_what_it_ignores():
    """Hand-computed value; the order inside the kept and the removed side does not matter, the split does."""
    target = [torch.tensor([4.0, 3.0, 2.0, 1.0])]  # removal ratio 0.5: keeps channels 0, 1
    pred = [torch.tensor([1.0, 0.0, 0.5, -1.0])]
    sp = torch.nn.functional.softplus
    # pairs (kept i, removed j): (0,2) (0,3) (1,2) (1,3): softplus(p_j - p_i)
    want = (sp(torch.tensor(-0.5)) + sp(torch.tensor(-2.0)) + sp(torch.tensor(0.5)) + sp(torch.tensor(-1.0))) / 4
    assert torch.allclose(pairwise_keep_loss(pred, target, 1.0, 0.5), want)
    assert torch.allclose(pairwise_keep_loss(pred, target, 2.0, 0.5),
                          (sp(torch.tensor(-0.25)) + sp(torch.tensor(-1.0)) + sp(torch.tensor(0.25))
                           + sp(torch.tensor(-0.5))) / 4)
    same_split = [torch.tensor([1.0, 2.0, 1.0, 2.0])]  # a target ranking the inside of each side differently
    other = pairwise_keep_loss(pred, [torch.tensor([3.0, 4.0, 1.0, 2.0])], 1.0, 0.5)
    assert torch.allclose(other, want)
    assert not torch.allclose(pairwise_keep_loss(pred, same_split, 1.0, 0.5), want)  # keeps 1, 3: another split
    with pytest.raises(ConfigError, match="nothing to learn"):
        pairwise_keep_loss(pred, target, 1.0, 0.0)  # a ratio that removes nothing


def test_pairwise_loss_learns_a_planted_split_that_transfers(tmp_path):
    train, held = [_planted(0), _planted(1)], _planted(2)
    ratio = 1 - 3.0 ** -0.5
    torch.manual_seed(0)
    before = Metanet.for_graph(held.graph, MetanetConfig(hidden=16, layers=1, output="score"))
    ov0 = keep_overlap(group_scores(before(held.graph).detach(), held.groups), held.targets, ratio)
    rank_train(train, [], tmp_path / "r", RankTrainConfig(steps=40, lr=1e-2, loss="pairwise", log_every=1000,
                                                          save_every=1000),
               MetanetConfig(hidden=16, layers=1), log=lambda m: None)
    net, meta = load_metanet(tmp_path / "r")
    assert meta["rank_train"]["loss"] == "pairwise"
    ov = keep_overlap(group_scores(net(held.graph).detach(), held.groups), held.targets, ratio)
    assert ov > 0.85 and ov > ov0 + 0.15, (ov0, ov)
    with pytest.raises(ConfigError, match="ranking loss"):
        RankTrainConfig(loss="hinge")


def test_meta_train_score_defaults_are_the_library_s():
    from metaprune.cli import build_parser

    ns = build_parser().parse_args(["meta-train", "--zoo", "z", "-o", "o", "--output-mode", "score"])
    d = RankTrainConfig()
    assert (ns.steps, ns.rank_loss, ns.tau, ns.average_from, ns.lr, ns.weight_decay, ns.target_speedup) == (
        d.steps, d.loss, d.tau, d.average_from, d.lr, d.weight_decay, d.speedup)


def test_vit_groups_map_to_graph_nodes_and_metanet_prunes_the_lowest_scored_heads(tmp_path):
    """On a ViT every torch-pruning group maps to graph nodes (attention: the fused q/k/v layer's node j
    carries rows j, j+d, j+2d), so a score metanetwork ranks heads and MLP channels, not the fallback."""
    torch.manual_seed(0)
    m = create_model("vit_tiny_p4", num_classes=4, in_chans=1, image_size=16).eval()
    for p in m.parameters():
        if p.dim() == 1:
            p.data.normal_(0, 1.0)  # distinct biases identify the kept heads
    g = to_graph(m)
    groups = group_nodes(m, g)
    assert groups and all(x.fallback is None for x in groups)
    node = torch.randn(g.x.shape[0], generator=torch.Generator().manual_seed(0))
    scores = dict(zip([x.key for x in groups], group_scores(node, groups)))
    lid = next(e["id"] for e in g.spec["layers"] if e["name"] == "encoder.layers.encoder_layer_2.self_attention.qkv")
    key = "encoder.layers.encoder_layer_2.self_attention.proj:in"
    assert torch.allclose(scores[key], node[g.node_layer == lid])  # channel j: the mean of 3 rows of node j
    net = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=1, output="score"))
    with torch.no_grad():
        net.score_prior.zero_()
        net.score_dec[-1].weight.normal_(0, 1.0)
    save_metanet(net, tmp_path / "s")
    scores, _ = predict_scores(net, m)
    res = prune(m, PruneConfig(ratio=0.34, criterion="metanet", metanet=str(tmp_path / "s"), round_to=1))
    att = res.model.encoder.layers[2].self_attention
    assert att.num_heads < 3  # heads removed
    head = scores[key].view(3, -1).mean(1)  # the heads the scores rank highest are the ones kept
    kept = torch.topk(head, att.num_heads).indices.sort().values
    old = m.encoder.layers[2].self_attention.qkv.bias.view(3, 3, 64)[:, kept].reshape(-1)
    assert torch.equal(att.qkv.bias, old)
