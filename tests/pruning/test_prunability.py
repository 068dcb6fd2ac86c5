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


def test_curve_is_measured_on_the_validation_split():
    """Validation images are all labelled 0 and test images 1; a model that always answers 0 scores
    100 % on validation and 0 % on test, at every point of the curve (the classifier is never pruned)."""
    from metaprune.data.datasets import DataSplits, TensorImageDataset

    g = torch.Generator().manual_seed(0)

    def split(n, label):
        images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
        labels = torch.full((n,), label) if label is not None else torch.randint(0, 10, (n,), generator=g)
        return TensorImageDataset(images, labels, (0.5,), (0.25,), classes=tuple(str(i) for i in range(10)))

    data = DataSplits("val-vs-test", split(64, None), split(32, 0), split(32, 1), num_classes=10, in_chans=1,
                      image_size=16)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10, 0, -1).float())  # logits 10, 9, ...: always class 0
    c = prunability_curve(model, data, max_speedup=2.0, steps=2, val_batches=None, calib_batches=1, batch_size=32)
    assert c["base_acc"] == 100.0 and c["accs"] == [100.0] * len(c["accs"]) and len(c["accs"]) >= 3
