"""The gate criterion optimises what the engine builds: its masked forward is the pruned network's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaprune.pruning import PruneConfig
from metaprune.pruning.criteria import SCORES_ATTR, ScoreImportance
from metaprune.pruning.engine import prune_once
from metaprune.pruning.gate import GatedForward, _hard_keep, gate_groups, learn_gate_scores


def _batches(n=2, batch=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_masked_forward_equals_the_pruned_network(tiny_resnet, ratio):
    """Every group (residual streams: all conv1s of their blocks, the downsample convs and the classifier after
    the pooling) is gated, no group is left fixed, and top-k of the learned scores at ``ratio`` is what the
    engine removes: the gated forward equals the pruned network's forward (BatchNorm on batch statistics)."""
    model = tiny_resnet
    with torch.no_grad():  # non-trivial BN affine parameters, so a missed channel shows in the output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.zeros(1, 1, 16, 16)
    cfg = PruneConfig(round_to=1, ratio=ratio, criterion="gate", gate_steps=2, seed=0)
    base = copy.deepcopy(model)
    learn_gate_scores(base, cfg, x, _batches())
    groups = gate_groups(model, cfg, x)
    assert len(groups) == 12 and all(g.fixed is None for g in groups)
    stream = next(g for g in groups if g.key == "layer3.0.downsample.0:out")
    assert {"fc", "layer3.1.conv1", "layer3.2.conv1"} <= {n for n, _, _ in stream.consumers}
    state = getattr(base, SCORES_ATTR)
    scores = [state["scores"][g.key] for g in groups]
    assert all(float(s.std()) > 0 for s in scores)  # learned, not all equal
    pruned = prune_once(copy.deepcopy(base), cfg, ratio, x)
    xb = _batches(1, 32, seed=1)[0][0]
    with GatedForward(model, groups) as gf, torch.no_grad():
        gf.set(_hard_keep(groups, scores, ratio, False, 1.0, 0.0))
        masked = model(xb)
        gf.set([torch.ones(g.units) for g in groups])
        full = model(xb)
    pruned.train()
    with torch.no_grad():
        out = pruned(xb)
    assert out.shape == masked.shape
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
    assert (out - full).abs().max() > 1e-2  # pruning changed the output, the comparison means something


def test_uniform_scores_compare_by_share_in_a_global_ranking():
    """Scores learned per group are not comparable across groups: in a global ranking (the engine's refine
    stage) the next channel to go is where it is the smallest share of its group, in score order."""
    conv = nn.Conv2d(1, 8, 1)
    state = {"scores": {"a:out": torch.tensor([5.0, 6.0, 7.0, 8.0]), "b:out": torch.tensor([-3.0, -2.0, 1.0, 0.0])},
             "initial": {"a:out": 8, "b:out": 4}, "global": False}
    conv._metaprune_gate_scores = state
    imp = ScoreImportance(conv)
    imp.key = lambda group: group  # noqa: E731  (the test passes the key as the "group")

    class _G(list):
        pass

    def call(key):
        g = _G([type("I", (), {"idxs": list(range(len(state["scores"][key])))})()])
        imp.key = lambda _g, key=key: key  # noqa: E731
        return imp(g)

    a, b = call("a:out"), call("b:out")
    # group a (4 of 8 left): its worst channel would be the 5th of 8 gone; group b (all 4 left): the 1st of 4
    assert torch.argsort(a).tolist() == [0, 1, 2, 3] and torch.argsort(b).tolist() == [0, 1, 3, 2]
    assert float(b.min()) < float(a.min())  # raw scores would remove a's channels last, b's first anyway
    assert float(a.min()) < float(b.sort().values[2])  # but a's next channel goes before b's third
    state["global"] = True  # learned with a global top-k: raw scores compare directly
    assert torch.equal(call("a:out"), state["scores"]["a:out"])


def test_gate_composes_with_reconstruction(tiny_resnet):
    """``--reconstruct`` refits the network the gate ranking chose: same widths and kept channels as without it,
    and the refitted layers' outputs come closer to the unpruned network's."""
    from metaprune.pruning import prune

    batches = _batches(2, 32)
    cfg = PruneConfig(round_to=1, ratio=0.4, criterion="gate", gate_steps=3, seed=1, reconstruct=False)
    plain = prune(tiny_resnet, cfg, input_shape=(1, 16, 16), calibration=batches)
    rec = prune(tiny_resnet, PruneConfig(round_to=1, ratio=0.4, criterion="gate", gate_steps=3, seed=1, reconstruct=True,
                                         reconstruct_batches=2), input_shape=(1, 16, 16), calibration=batches)
    assert rec.history == plain.history  # the same gate ranking, hence the same channels removed
    assert rec.info["gate"]["steps"] == 3 and rec.info["reconstruct"]["layers"] > 0
    assert rec.info["reconstruct"]["rel_err_after"] < rec.info["reconstruct"]["rel_err_before"]
    assert not torch.equal(rec.model.layer1[0].conv2.weight, plain.model.layer1[0].conv2.weight)
