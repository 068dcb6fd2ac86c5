"""End to end: ``metaprune zoo`` -> ``meta-train`` -> ``transform`` on synthetic data (tiny)."""

from __future__ import annotations

import json

import pytest

from metaprune.cli import main
from metaprune.io import load_model


@pytest.mark.slow
def test_zoo_meta_train_transform(tmp_path):
    zoo, mn = tmp_path / "zoo", tmp_path / "mn"
    common = ["--data", "synthetic", "--quiet", "--device", "cpu"]
    assert main(["zoo", "--model", "cifar_resnet20", "--count", "3", "--epochs", "1", "--max-steps-per-epoch", "2",
                 "-o", str(zoo), *common]) == 0
    mtime = (zoo / "member_000" / "model.safetensors").stat().st_mtime
    # resumable: a rerun skips finished members
    assert main(["zoo", "--model", "cifar_resnet20", "--count", "3", "--epochs", "1", "--max-steps-per-epoch", "2",
                 "-o", str(zoo), *common]) == 0
    assert (zoo / "member_000" / "model.safetensors").stat().st_mtime == mtime
    assert main(["meta-train", "--zoo", str(zoo), "-o", str(mn), "--epochs", "1", "--steps-per-member", "1",
                 "--hidden", "8", "--layers", "1", "--score-steps", "1", "--score-batches", "1",
                 "--batch-size", "16", "--val-members", "1", "--lam", "1", "--sparsity", "functional",
                 "--quiet", "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (mn / "log.jsonl").read_text().splitlines()]
    assert {"ce", "ce_pruned", "sparsity", "score"} <= set(log[0]) and log[0]["ce_pruned"] > 0
    cfg = json.loads((mn / "config.json").read_text())
    assert cfg["val_members"] == ["member_002"] and "member_002" not in cfg["train_members"]
    out = tmp_path / "edited.safetensors"
    assert main(["transform", str(zoo / "member_000" / "model.safetensors"), "--metanet", str(mn), "-o", str(out),
                 "--calib-batches", "1", *common]) == 0
    model, info = load_model(out)
    assert info.arch == "cifar_resnet20" and info.extra["metanet"] == str(mn)


def test_transform_refuses_wrong_metanet(tmp_path, capsys):
    (tmp_path / "mn").mkdir()
    assert main(["transform", "x.safetensors", "--metanet", str(tmp_path / "mn"), "-o", str(tmp_path / "o.safetensors"),
                 "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
