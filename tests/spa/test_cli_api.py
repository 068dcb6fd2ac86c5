"""`metaprune adapt` / `metaprune merge` end to end on synthetic data (tiny), and adapt_tasks."""

import json

import pytest
import torch

from metaprune.cli import main
from metaprune.errors import ConfigError
from metaprune.io import load_model
from metaprune.pruning import PruneConfig
from spa import load_bundle
from spa.api import AdaptConfig, adapt_tasks


def test_config_validation():
    with pytest.raises(ConfigError):
        AdaptConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="unpruned"):
        AdaptConfig(method="lora", ratio=0.5)
    cfg = AdaptConfig.from_namespace({"epochs": 2, "rank": 4, "unrelated": 1}, method="hydra", ratio=0.3)
    assert (cfg.recovery_epochs, cfg.rank, cfg.method, cfg.ratio) == (2, 4, "hydra", 0.3)


def test_merge_cli_on_saved_bundle(source_path, tmp_path, capsys):
    """`metaprune merge` then `metaprune eval` on a bundle written without training (fast)."""
    from test_bundle import _pruned_adapted, _save

    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    bundle = _save(m, "splora", src, tmp_path / "b")
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(bundle), "--source", source_path, "-o", str(merged), "-q"]) == 0
    model, info = load_model(merged)
    x = torch.randn(2, 1, 28, 28)
    assert info.arch == "cifar_resnet20" and model.fc.out_features == 4
    assert (model.eval()(x) - load_bundle(bundle, src)(x)).abs().max() <= 1e-5
    assert main(["eval", str(merged), "--data", "synthetic", "--no-latency", "--json", "-q"]) == 0
    assert main(["merge", str(bundle), "--source", source_path, "-o", source_path, "-q"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_adapt_merge_eval_cli(source_path, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(["adapt", source_path, "--task", "synthetic", "--method", "splora", "--rank", "2", "--ratio", "0.5",
               "--steps", "1", "--warmup-epochs", "0", "--recovery-epochs", "1", "--max-steps-per-epoch", "2",
               "--batch-size", "16", "--device", "cpu", "-q", "-o", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "splora" and cfg["rank"] == 2 and cfg["num_classes"] == 4
    assert abs(report["test_acc"] - report["test_acc_masked"]) < 1e-6  # merged model == masked model
    assert report["macs"]["pruned"] < report["macs"]["source"]
    assert report["bundle_bytes"] < report["dense_pruned_bytes"]
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(out), "--source", source_path, "-o", str(merged), "-q"]) == 0
    model, info = load_model(merged)
    assert info.arch == "cifar_resnet20" and model.fc.out_features == 4
    assert main(["eval", str(merged), "--data", "synthetic", "--no-latency", "--json", "-q"]) == 0
    # refusing to overwrite the source
    assert main(["merge", str(out), "--source", source_path, "-o", source_path, "-q"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_adapt_tasks_signature_and_config(tmp_path, source_path):
    with pytest.raises(ConfigError):
        AdaptConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="unpruned"):
        AdaptConfig(method="lora", ratio=0.5)
    res = adapt_tasks(source_path, ["synthetic"], "hydra", 0.3, tmp_path,
                      {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 16, "device": "cpu", "rank": 2,
                       "warmup_epochs": 0, "steps": 1})
    assert len(res) == 1 and (tmp_path / "synthetic" / "adapter_model.safetensors").exists()
    assert res[0].report["method"] == "hydra" and res[0].report["ratio"] == 0.3
    assert torch.isfinite(torch.tensor(res[0].report["test_acc"]))


def test_cli_defaults_equal_library_defaults(monkeypatch):
    """`metaprune adapt` and `metaprune prune --task` run exactly AdaptConfig()'s schedule when no option is given."""
    import spa.api as api
    from metaprune.cli import build_parser

    p = build_parser()
    ns = p.parse_args(["adapt", "--task", "synthetic", "-o", "x"])
    assert AdaptConfig.from_namespace(ns) == AdaptConfig()
    seen = []
    monkeypatch.setattr(api, "adapt_task", lambda src, task, out, cfg: seen.append(cfg))
    # prune's finetuning options (--epochs 0, --lr 0.01, one-cycle) are not an adaptation schedule
    ns = p.parse_args(["prune", "--ratio", "0.5", "--task", "synthetic", "-o", "x"])
    adapt_tasks("src", ns.task, ns.method, ns.ratio, "x", ns)
    ns = p.parse_args(["prune", "--ratio", "0.5", "--task", "synthetic", "--seed", "3", "--train-subset", "99",
                       "-o", "x"])
    adapt_tasks("src", ns.task, ns.method, ns.ratio, "x", ns)
    ns = p.parse_args(["prune", "--ratio", "0.5", "--task", "synthetic", "--epochs", "2", "-o", "x"])
    adapt_tasks("src", ns.task, ns.method, ns.ratio, "x", ns)
    crit = PruneConfig.criterion  # prune's criterion (default: functional), not adapt's own default
    assert crit != AdaptConfig.criterion
    assert seen[0] == AdaptConfig(ratio=0.5, criterion=crit)
    assert seen[1] == AdaptConfig(ratio=0.5, seed=3, train_subset=99, criterion=crit)
    assert seen[2] == AdaptConfig(ratio=0.5, recovery_epochs=2, criterion=crit)


@pytest.mark.parametrize("bad", [{"lr": float("nan")}, {"lr": float("inf")}, {"weight_decay": float("nan")},
                                 {"rank": "8"}, {"steps": 0}, {"min_steps": -1}, {"batch_size": 2.5},
                                 {"method": "nope"}, {"val_fraction": 1.0}, {"schedule": "linear"}])
def test_bad_adapt_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        AdaptConfig(**bad)
