"""Prunability curve: deterministic, evaluated on the validation split, AUC normalised, plot written."""

from __future__ import annotations

import torch

from metaprune.models import create_model
from metaprune.pruning import plot_curve, prunability_curve
from metaprune.pruning.curve import _auc


def test_auc_is_mean_accuracy_over_the_range():
    assert abs(_auc([1.0, 3.0], [80.0, 80.0], 3.0, 10.0) - 80.0) < 1e-6
    assert abs(_auc([1.0, 3.0], [80.0, 40.0], 3.0, 10.0) - 60.0) < 1e-6
    # curve stops at 2x: the rest counts as chance
    assert abs(_auc([1.0, 2.0], [80.0, 80.0], 3.0, 10.0) - 45.0) < 0.5


def test_curve_is_deterministic_and_plots(synthetic_data, tmp_path):
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    kw = dict(max_speedup=2.5, steps=3, val_batches=1, calib_batches=2, batch_size=64)
    c1 = prunability_curve(model, synthetic_data, **kw)
    c2 = prunability_curve(model, synthetic_data, **kw)
    assert c1["accs"] == c2["accs"] and c1["speedups"] == c2["speedups"]
    assert c1["split"] == "val" and c1["speedups"][0] == 1.0
    assert c1["speedups"][-1] >= 2.5 * 0.9
    assert all(b > a for a, b in zip(c1["speedups"], c1["speedups"][1:]))
    assert 0.0 <= c1["auc"] <= 100.0
    png = plot_curve(c1, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
