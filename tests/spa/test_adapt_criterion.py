"""`metaprune adapt --criterion`: l2 / functional / random channel rankings on fused weights."""

import json

import pytest
import torch
from spa_helpers import trained_adapter

from metaprune.cli import main
from metaprune.errors import ConfigError
from metaprune.io import load_model
from spa import load_bundle
from spa.api import AdaptConfig
from spa.masks import CRITERIA, functional_importance, importance, random_importance, step_keep
from spa.prune import ChannelGroup, Member, build_graph, channel_groups


@pytest.fixture(scope="module")
def adapted(source_path):
    src, _ = load_model(source_path)
    m = trained_adapter(src, seed=5)
    dg = build_graph(m, torch.zeros(1, 1, 28, 28))
    return m, channel_groups(m, dg, m.get_submodule(m.spa_head))


def _cols(layer):
    w, _ = layer.fused()
    return w.detach().double().transpose(0, 1).flatten(1).norm(dim=1)


def test_functional_equals_hand_computation(adapted):
    m, groups = adapted
    g = next(g for g in groups if g.root == "layer1.0.conv1")
    assert {(x.name, x.dim) for x in g.members} == {("layer1.0.conv1", "out"), ("layer1.0.bn1", "out"),
                                                     ("layer1.0.conv2", "in")}
    bn = m.layer1[0].bn1
    gb = torch.stack([bn.weight.detach().double(), bn.bias.detach().double()], 1).norm(dim=1)
    cols = _cols(m.layer1[0].conv2)
    expect = (gb / gb.mean()) * (cols / cols.mean())
    got = functional_importance(m, g)
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)
    # the norm layer's (gamma, beta) decide the producer factor, not the conv's rows
    assert not torch.allclose(torch.argsort(got), torch.argsort(importance(m, g, "l2")))

    # without a norm member: ||fused rows, bias|| x ||fused columns||
    conv = m.layer1[0].conv1
    w, b = conv.fused()
    assert b is None  # resnet convs have no bias; the head below has one
    rows = w.detach().double().flatten(1).norm(dim=1)
    g2 = ChannelGroup("layer1.0.conv1", 16, [Member("layer1.0.conv1", "out", list(range(16))),
                                             Member("layer1.0.conv2", "in", list(range(16)))])
    torch.testing.assert_close(functional_importance(m, g2), (rows / rows.mean()) * (cols / cols.mean()),
                               rtol=1e-9, atol=1e-12)
    w, b = m.fc.fused()  # a producer with a bias and no consumer: ||(w_c, b_c)|| alone
    assert b is not None
    rows = (w.detach().double().pow(2).sum(1) + b.detach().double().pow(2)).sqrt()
    g3 = ChannelGroup("fc", 4, [Member("fc", "out", [0, 1, 2, 3])])
    torch.testing.assert_close(functional_importance(m, g3), rows / rows.mean(), rtol=1e-9, atol=1e-12)

    # several members: each normalised by its own mean, then summed (producers and consumers apart)
    g = next(g for g in groups if g.root == "conv1")
    norms = [x for x in g.members if isinstance(m.get_submodule(x.name), torch.nn.BatchNorm2d)]
    cons = [x for x in g.members if x.dim == "in"]
    prod = sum(v / v.mean() for v in (torch.stack([m.get_submodule(x.name).weight.detach().double(),
                                                   m.get_submodule(x.name).bias.detach().double()], 1).norm(dim=1)
                                      for x in norms))
    con = sum(v / v.mean() for v in (_cols(m.get_submodule(x.name)) for x in cons))
    assert len(norms) == 4 and len(cons) == 5
    torch.testing.assert_close(functional_importance(m, g), prod * con, rtol=1e-9, atol=1e-12)


def test_random_is_seeded(adapted):
    _, groups = adapted
    g = groups[0]
    a, b, c = random_importance(g, 3), random_importance(g, 3), random_importance(g, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(1, g.size + 1))  # a permutation: no ties
    assert not torch.equal(random_importance(groups[1], 3)[:16], random_importance(groups[2], 3)[:16])


WEIGHT_CRITERIA = [c for c in CRITERIA if c != "gate"]  # gate learns on data: tests/spa/test_adapt_gate.py


@pytest.mark.parametrize("criterion", WEIGHT_CRITERIA)
def test_step_keep_keeps_the_top_scored(adapted, criterion):
    m, groups = adapted
    keep = step_keep(m, groups, 0.5, criterion=criterion, seed=7)
    for g in groups:
        score = importance(m, g, criterion, seed=7)
        n = max(1, round(g.size * 0.5))
        top = set(torch.argsort(score, descending=True)[:n].tolist())
        assert set(torch.nonzero(keep[g.root]).flatten().tolist()) == top, (criterion, g.root)
    others = [c for c in WEIGHT_CRITERIA if c != criterion]
    for o in others:  # the criterion given is the one used: the kept sets differ from the other criteria's
        ko = step_keep(m, groups, 0.5, criterion=o, seed=7)
        assert any(not torch.equal(keep[g.root], ko[g.root]) for g in groups), (criterion, o)


def test_gate_needs_data(adapted):
    m, groups = adapted
    with pytest.raises(ConfigError, match="learns its ranking on data"):
        step_keep(m, groups, 0.5, criterion="gate")


@pytest.mark.parametrize("bad", ["taylor", "metanet", "L2", "nope", 3])
def test_bad_criterion_is_a_config_error(adapted, bad):
    with pytest.raises(ConfigError, match="prune` / `curve` only" if bad in ("taylor", "metanet")
                       else "unknown adapt criterion"):
        AdaptConfig(criterion=bad)
    m, groups = adapted
    with pytest.raises(ConfigError):
        step_keep(m, groups, 0.5, criterion=bad)


def test_adapt_cli_records_the_criterion(source_path, tmp_path, monkeypatch, capsys):
    import spa.masks

    seen = []
    real = spa.masks.step_keep

    def spy(model, groups, ratio, criterion="l2", seed=0):
        seen.append((criterion, seed))
        return real(model, groups, ratio, criterion=criterion, seed=seed)

    monkeypatch.setattr(spa.masks, "step_keep", spy)
    out = tmp_path / "bundle"
    rc = main(["adapt", source_path, "--task", "synthetic", "--rank", "2", "--ratio", "0.5", "--steps", "2",
               "--criterion", "functional", "--seed", "11", "--warmup-epochs", "0", "--recovery-epochs", "1",
               "--max-steps-per-epoch", "1", "--batch-size", "16", "--device", "cpu", "-q", "-o", str(out)])
    assert rc == 0
    assert seen == [("functional", 12), ("functional", 13)]
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "functional" and report["config"]["criterion"] == "functional"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["extra"]["criterion"] == "functional"
    src, _ = load_model(source_path)
    load_bundle(out, src.eval())  # the recorded key does not upset the bundle's validation
    assert main(["adapt", source_path, "--task", "synthetic", "--criterion", "taylor", "-q",
                 "-o", str(tmp_path / "b2")]) == 2
    assert "prune` / `curve` only" in capsys.readouterr().err


def test_prune_task_passes_the_criterion_on(source_path, tmp_path, monkeypatch, capsys):
    """`prune --task` adapts with prune's --criterion (it used to adapt with l2 whatever was asked)."""
    import spa.masks

    seen = []
    real = spa.masks.step_keep

    def spy(model, groups, ratio, criterion="l2", seed=0):
        seen.append(criterion)
        return real(model, groups, ratio, criterion=criterion, seed=seed)

    monkeypatch.setattr(spa.masks, "step_keep", spy)
    base = ["prune", source_path, "--task", "synthetic", "--ratio", "0.5", "--batch-size", "16",
            "--max-steps-per-epoch", "1", "--device", "cpu", "-q"]
    assert main([*base, "--criterion", "random", "-o", str(tmp_path / "a")]) == 0
    assert seen and set(seen) == {"random"}
    report = json.loads((tmp_path / "a" / "synthetic" / "report.json").read_text())
    assert report["criterion"] == "random"
    assert main([*base, "--criterion", "taylor", "-o", str(tmp_path / "b")]) == 2
    assert "prune` / `curve` only" in capsys.readouterr().err
