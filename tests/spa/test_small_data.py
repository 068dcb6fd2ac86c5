"""`adapt` with its default learning rate and minimum steps learns a small user image folder (issue 12, item 10).

With the old schedule (epochs only, lr 0.05) a small folder got a handful of optimisation steps per
phase and ended near chance; every phase now runs at least ``min_steps`` steps.
"""

import json
from pathlib import Path

import pytest
import torch

from metaprune.cli import main
from spa.api import AdaptConfig, phase_epochs, source_normalisation, steps_per_epoch

SOURCE = Path(__file__).resolve().parents[2] / "checkpoints" / "cifar_resnet20_fmnist.safetensors"
CLASSES = (0, 2, 6)  # T-shirt, pullover, shirt: the three Fashion-MNIST classes that look most alike


def _folder(root: Path, per_train: int, per_test: int) -> Path:
    from PIL import Image

    from metaprune.data.datasets import load_fashion_mnist

    try:
        train, test = load_fashion_mnist()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST files not available ({e})")
    g = torch.Generator().manual_seed(0)
    for split, ds, n in (("train", train, per_train), ("test", test, per_test)):
        for c in CLASSES:
            idx = (ds.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)[:n]]
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in idx.tolist():
                Image.fromarray(ds.images[i, 0].numpy()).save(d / f"{i}.png")
    return root


def test_schedule_scales_with_the_data():
    cfg = AdaptConfig()
    # 1,620 training images at batch 128: 12 steps an epoch -> 9 epochs a phase for >= 100 steps
    assert steps_per_epoch(cfg, 1620) == 12
    assert phase_epochs(cfg, 1, 1620) == -(-cfg.min_steps // 12)
    assert phase_epochs(cfg, 1, 60000) == 1  # large data: the epochs given
    assert phase_epochs(cfg, 0, 1620) == 0  # a phase switched off stays off
    assert phase_epochs(AdaptConfig(min_steps=0), 1, 1620) == 1
    assert phase_epochs(AdaptConfig(max_steps_per_epoch=4), 1, 1620) == 1  # a quick run stays quick
    # the lr suits the adapters and the head; full fine-pruning keeps its lower one
    assert AdaptConfig().lr > 0.05 and AdaptConfig(method="full").lr == 0.01
    assert source_normalisation({"data": "fashion-mnist"}) == ((0.2860,), (0.3530,))
    assert source_normalisation({"data": "fmnist-tops"}) == ((0.2860,), (0.3530,))
    assert source_normalisation({"data": "imagefolder:/x"}) is None


@pytest.mark.data
def test_small_imagefolder_learns_with_defaults(tmp_path):
    """180 images of three similar classes: clearly above chance (33 %) with the default schedule."""
    root = _folder(tmp_path / "folder", per_train=60, per_test=50)
    out = tmp_path / "bundle"
    # the defaults decide the learning (lr, min steps, schedule); batch 16 and one pruning step keep it short
    rc = main(["adapt", str(SOURCE), "--task", f"imagefolder:{root}", "--ratio", "0.5", "--steps", "1",
               "--batch-size", "16", "--device", "cpu", "--seed", "0", "-q", "-o", str(out)])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["config"]["lr"] == AdaptConfig().lr and r["config"]["min_steps"] == AdaptConfig().min_steps
    assert r["phase_epochs"]["warmup"] > 1  # the small folder got more epochs than asked for
    assert r["test_acc"] >= 60.0, r["history"]
