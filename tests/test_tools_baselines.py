"""tools/baselines.py's summary: paired differences vs the best free baseline, SE, sign counts, gap share."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("baselines_tool", Path(__file__).parents[1] / "tools" / "baselines.py")
bl = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bl)


def _member(name, **arms):
    out = {}
    for arm, (val, test, ft) in arms.items():
        out[f"{arm}@3x"] = {"val_acc": val, "test_acc": test, "ft_test_acc": ft, "speedup": 3.0,
                            "criterion_seconds": 2.0 if arm == "gate" else 0.0, "prune_seconds": 1.0,
                            "eval_seconds": 1.0, "finetune_seconds": 3.0, "seconds": 5.0}
    return {"name": name, "base_test_acc": 85.0, "arms": out}


def test_paired_vs_best_free_baseline_and_gap_share():
    members = [
        _member("a", l2=(30, 30, 78), functional=(50, 50, 79), random=(20, 20, 77), gate=(70, 70, 80),
                metanet=(60, 60, 80)),
        _member("b", l2=(40, 40, 80), functional=(45, 45, 79.5), random=(30, 30, 78), gate=(80, 80, 81),
                metanet=(50, 50, 79.5)),
        _member("c", l2=(35, 35, 79), functional=(55, 55, 80.5), random=(25, 25, 78), gate=(75, 75, 80),
                metanet=(55, 55, 81.5)),
    ]
    s = bl.summarize(members, ["l2", "functional", "random", "gate", "metanet"], [3.0])["speedups"]["3x"]
    ft = s["metrics"]["ft_test_acc"]
    # best free by mean over the same members: functional 79.67 > l2 79.0 > random 77.67
    bf = ft["paired"]["metanet"]["best_free"]
    assert bf["baseline"] == "functional"
    d = [1.0, 0.0, 1.0]
    assert bf["mean"] == pytest.approx(sum(d) / 3)
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert bf["se"] == pytest.approx(sd / math.sqrt(3))
    assert (bf["wins"], bf["ties"], bf["losses"]) == (2, 1, 0)
    assert ft["paired"]["metanet"]["l2"]["mean"] == pytest.approx((2 - 0.5 + 2.5) / 3)
    assert "best_free" not in ft["paired"]["l2"]  # a free baseline is not compared with the best of itself
    # no-finetune test: best free is functional too; gap share (metanet - l2) / (gate - l2)
    gap = s["metanet_gap_share"]["test_acc"]
    shares = [30 / 40, 10 / 40, 20 / 40]
    assert gap["mean_share"] == pytest.approx(sum(shares) / 3)
    assert gap["pooled_share"] == pytest.approx((60 / 3) / (120 / 3))
    assert s["seconds"]["gate"]["criterion_seconds"] == 2.0 and s["seconds"]["gate"]["n"] == 3


def test_stale_results_and_missing_baselines_are_left_out():
    members = [
        _member("a", l2=(30, 30, 78), functional=(50, 50, 79), random=(20, 20, 77), gate=(70, 70, 80)),
        _member("b", l2=(40, 40, 80), functional=(45, 45, 79.5), random=(30, 30, 78), gate=(80, 80, 90)),
        _member("c", l2=(35, 35, 79), functional=(55, 55, 80.5), gate=(75, 75, 80)),  # no random: not paired
    ]
    members[1]["arms"]["gate@3x"]["stale"] = True  # an older gate.py: must not be mixed in
    s = bl.summarize(members, ["l2", "functional", "random", "gate"], [3.0])["speedups"]["3x"]
    ft = s["metrics"]["ft_test_acc"]
    assert ft["mean"]["gate"] == {"n": 2, "mean": 80.0, "se": 0.0}
    bf = ft["paired"]["gate"]["best_free"]
    assert bf["n"] == 1 and bf["baseline"] == "functional" and bf["mean"] == pytest.approx(1.0)
    assert ft["paired"]["gate"]["l2"]["n"] == 2


def test_sparse_learning_arm_shrinks_weak_groups_and_the_control_does_not_regularise():
    """The depgraph arm's training phase: with the group-norm regulariser the groups it pushes end smaller than
    after the same steps without it (sl-control), whose weights move by plain SGD only."""
    import copy

    import torch

    from metaprune.data import load_dataset
    from metaprune.models import create_model
    from metaprune.pruning import SparseRegularizer

    data = load_dataset("synthetic", num_classes=4, in_chans=1, image_size=16)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=4, in_chans=1)
    shape = (1, 16, 16)
    sl, ctl = copy.deepcopy(model), copy.deepcopy(model)
    info = bl._sparse_train(sl, data, shape, steps=6, lam=0.5, lr=0.01, seed=0)
    info0 = bl._sparse_train(ctl, data, shape, steps=6, lam=0.0, lr=0.01, seed=0)
    assert info["steps"] == info0["steps"] == 6 and info["lam"] == 0.5 and info0["lam"] == 0.0
    n_sl = torch.cat(SparseRegularizer(sl, shape, 0.5).group_norms())
    n_ctl = torch.cat(SparseRegularizer(ctl, shape, 0.5).group_norms())
    assert n_sl.sum() < 0.9 * n_ctl.sum(), (n_sl.sum(), n_ctl.sum())
    assert not sl.training and not ctl.training
    assert any(not torch.equal(a, b) for a, b in zip(ctl.state_dict().values(), model.state_dict().values()))


def test_summary_states_the_protocol_the_results_were_made_with(tmp_path):
    """--summary-only rebuilds the table with the invocation's default flags; the header must still give the
    finetune the arms ran with (their fingerprints), and say 'mixed' when they differ."""
    import json

    out = tmp_path / "m.json"
    fp = {k: v for k, v in [("gate_steps", 250), ("gate_batch", 128), ("reconstruct_batches", 8), ("bn_batches", 8),
                            ("finetune_steps", 120), ("finetune_epochs", 2), ("finetune_lr", 0.01), ("seed", 0),
                            ("pruning", "uniform, round_to=1")]}
    mem = dict(_member("a", l2=(30, 30, 78), functional=(50, 50, 79)), zoo="runs/z", source="runs/z/a")
    for r in mem["arms"].values():
        r["fingerprint"] = dict(fp)
    bl._members_dir(out).mkdir(parents=True)
    bl._member_file(out, "a").write_text(json.dumps(mem))
    setup = {"data": "x", "speedups": [3.0], "arms": ["l2"], "gate_steps": 250, "gate_batch": 128,
             "reconstruct_batches": 8, "bn_batches": 8, "finetune_steps": 40, "finetune_epochs": 2,
             "finetune_lr": 0.01, "seed": 0, "pruning": "uniform, round_to=1", "min_base_acc": 70.0}
    res = bl._save_summary(out, setup)
    assert res["setup"]["finetune_steps"] == 120
    assert "2 epochs x 120 steps = 240 steps" in out.with_suffix(".md").read_text()
    mem["arms"]["functional@3x"]["fingerprint"]["finetune_steps"] = 40
    bl._member_file(out, "a").write_text(json.dumps(mem))
    bl._save_summary(out, setup)
    assert "mixed: 120, 40" in out.with_suffix(".md").read_text()
