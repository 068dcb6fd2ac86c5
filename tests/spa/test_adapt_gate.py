"""`metaprune adapt --criterion gate`: the data-optimised ranking at every pruning step (spa.gate)."""

import copy
import json

import pytest
import torch
from spa_helpers import trained_adapter
from torch import nn

from metaprune.cli import main
from metaprune.io import load_model
from metaprune.models import create_model
from metaprune.pruning.gate import GatedForward
from spa.gate import gate_groups, gate_step_keep
from spa.masks import current_keep, keep_count, step_keep
from spa.prune import apply_masks, build_graph, channel_groups, layer_masks


def _adapted(src, shape, seed=5):
    m = trained_adapter(src, seed=seed)
    dg = build_graph(m, torch.zeros(1, *shape))
    return m, channel_groups(m, dg, m.get_submodule(m.spa_head))


def _vit():
    torch.manual_seed(0)
    m = create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=12)
    with torch.no_grad():
        m.encoder.pos_embedding.normal_(0, 0.5)
    return m


def _batch_stats(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_gates_on_consumer_inputs_equal_the_masks(source_path, kind):
    """Hard gates on the adapted consumers' inputs compute what spa's channel / head masks compute."""
    src, shape = ((load_model(source_path)[0], (1, 28, 28)) if kind == "resnet" else (_vit(), (1, 12, 12)))
    m, groups = _adapted(src, shape)
    assert any(g.attention for g in groups) == (kind == "vit")
    gen = torch.Generator().manual_seed(0)
    keep = {g.root: torch.rand(g.size, generator=gen) < 0.6 for g in groups}
    for k in keep.values():
        k[0] = True
    x = torch.randn(8, *shape, generator=gen)
    masked = copy.deepcopy(m)
    apply_masks(masked, layer_masks(masked, groups, keep))
    _batch_stats(masked)
    with torch.no_grad():
        want = masked(x)
        gg = gate_groups(m, groups)
        with GatedForward(m, gg) as gated:
            gated.set([keep[g.root].float() for g in groups])
            got = m(x)
            gated.set([torch.ones(g.size) for g in groups])
            full = m(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the gates did something


def test_gate_keeps_the_channels_that_matter_where_l2_does_not(source_path):
    """Half of a group's channels are dead (BN gamma = beta = 0) but have the largest weights: l2 keeps them,
    the gate keeps the live half exactly."""
    m, groups = _adapted(load_model(source_path)[0], (1, 28, 28))
    g = next(g for g in groups if g.root == "layer1.0.conv1")
    dead = torch.arange(g.size) % 2 == 0
    with torch.no_grad():
        conv, bn = m.get_submodule("layer1.0.conv1"), m.get_submodule("layer1.0.bn1")
        conv.weight[dead] *= 20
        bn.weight[dead] = 0.0
        bn.bias[dead] = 0.0
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 4, (32,), generator=gen))
               for _ in range(4)]
    # this group alone (in a random network the other groups' removals would drown its small signal)
    keep, stats = gate_step_keep(m, [g], 0.5, batches, steps=100, lr=0.05, seed=0)
    assert torch.equal(keep[g.root], ~dead)
    assert stats["steps"] == 100 and stats["seconds"] > 0 and stats["loss_last"] < 1e-6
    l2 = step_keep(m, [g], 0.5, criterion="l2")
    assert torch.equal(l2[g.root], dead)
    again, _ = gate_step_keep(m, [g], 0.5, batches, steps=100, lr=0.05, seed=0)
    assert torch.equal(keep[g.root], again[g.root])  # deterministic under the seed


def test_pruned_units_stay_pruned(source_path):
    m, groups = _adapted(load_model(source_path)[0], (1, 28, 28))
    first = step_keep(m, groups, 0.25, criterion="random", seed=3)
    apply_masks(m, layer_masks(m, groups, first))
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 4, (16,), generator=gen))]
    keep, _ = gate_step_keep(m, groups, 0.5, batches, steps=5, lr=0.05, seed=0)
    for g in groups:
        alive = current_keep(m, g)
        assert not bool((keep[g.root] & ~alive).any()), g.root
        assert int(keep[g.root].sum()) == max(1, round(g.size * 0.5))


def test_adapt_cli_with_gate(source_path, tmp_path, monkeypatch):
    import spa.gate

    calls = []
    real = spa.gate.gate_step_keep

    def spy(model, groups, ratio, batches, steps, lr, seed=0, desc="gate"):
        calls.append((round(ratio, 3), steps, seed))
        return real(model, groups, ratio, batches, steps, lr, seed=seed, desc=desc)

    monkeypatch.setattr(spa.gate, "gate_step_keep", spy)
    out = tmp_path / "b"
    rc = main(["adapt", source_path, "--task", "synthetic", "--rank", "2", "--ratio", "0.5", "--steps", "2",
               "--criterion", "gate", "--gate-steps", "3", "--seed", "4", "--warmup-epochs", "0",
               "--recovery-epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16", "--device", "cpu",
               "-q", "-o", str(out)])
    assert rc == 0
    assert calls == [(0.25, 3, 5), (0.5, 3, 6)]
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "gate" and report["config"]["gate_steps"] == 3
    gates = [h["gate"] for h in report["history"] if "gate" in h]
    assert [s["steps"] for s in gates] == [3, 3] and all(s["seconds"] > 0 for s in gates)


def test_removed_units_stay_out_of_every_step(source_path, monkeypatch):
    """While the gate trains, units pruned at earlier steps are 0 in every gate (the reference's too) and a
    step's top-k keeps int(units x (1 - u)) of the others."""
    m, groups = _adapted(load_model(source_path)[0], (1, 28, 28))
    apply_masks(m, layer_masks(m, groups, step_keep(m, groups, 0.25, criterion="random", seed=3)))
    alive = [current_keep(m, g) for g in groups]
    seen = []
    real = GatedForward.set
    monkeypatch.setattr(GatedForward, "set", lambda self, gates: (seen.append([x.detach().clone() for x in gates]),
                                                                  real(self, gates))[1])
    gen = torch.Generator().manual_seed(2)
    gate_step_keep(m, groups, 0.5, [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 4, (8,)))],
                   steps=3, lr=0.05, seed=0)
    assert len(seen) == 6  # reference + gated, per step
    for gates in seen:
        for g, a, x in zip(groups, alive, gates):
            assert not bool(x[~a].any()), g.root
    for gates in seen[1::2]:  # the gated passes: u in [0.475, 0.5]
        for g, x in zip(groups, gates):
            assert keep_count(g.size, 0.5) <= int((x > 0).sum()) <= keep_count(g.size, 0.475), g.root


def test_gate_trains_at_the_widths_adapt_builds(monkeypatch):
    """Heads and channels keep keep_count(size, u) units in every gate step (3 heads at 50 %: 2, as the step keeps)."""
    m, groups = _adapted(_vit(), (1, 12, 12))
    seen = []
    real = GatedForward.set
    monkeypatch.setattr(GatedForward, "set", lambda self, gates: (seen.append([x.detach().clone() for x in gates]),
                                                                  real(self, gates))[1])
    gen = torch.Generator().manual_seed(2)
    keep, _ = gate_step_keep(m, groups, 0.5, [(torch.randn(8, 1, 12, 12, generator=gen), torch.randint(0, 4, (8,)))],
                             steps=3, lr=0.05, seed=0)
    heads = [i for i, g in enumerate(groups) if g.attention]
    assert heads and all(groups[i].size == 3 and int(keep[groups[i].root].sum()) == 2 for i in heads)
    for gates in seen[1::2]:
        for g, x in zip(groups, gates):
            assert keep_count(g.size, 0.5) <= int((x > 0).sum()) <= keep_count(g.size, 0.475), g.root
