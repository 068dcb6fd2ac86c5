"""`metaprune prune / report / curve`: outputs, reload with `metaprune eval`, errors leave the input untouched."""

from __future__ import annotations

import json

import pytest
import torch

from metaprune.cli import main
from metaprune.io import file_sha256, load_model, save_model
from metaprune.models import create_model


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    return str(save_model(create_model("cifar_resnet20", num_classes=10, in_chans=1), tmp_path / "src.safetensors"))


def test_prune_writes_model_and_report_and_reloads(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", model_file, "--ratio", "0.5", "--data", "synthetic", "--eval-batches", "1",
               "--no-latency", "-o", str(out), "-q"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "MACs / image" in table and "layer1.0.conv1" in table
    rep = json.loads((out / "report.json").read_text())
    assert rep["ratios"]["macs"] > 2.5 and rep["after"]["params"] < rep["before"]["params"]
    assert "test_acc" in rep["after"] and rep["widths"]["after"]["layer1.0.conv1"] == 8
    model, _ = load_model(out / "model.safetensors")
    assert model.layer1[0].conv1.out_channels == 8 and model.fc.out_features == 10
    assert main(["eval", str(out / "model.safetensors"), "--data", "synthetic", "--no-latency", "-q"]) == 0
    assert main(["report", str(out)]) == 0
    assert "MACs / image" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--ratio", "1.5"], ["--ratio", "0"], ["--speedup", "400"],
                                  ["--ratio", "0.5", "--ignore", "layer9.conv"], ["--params-ratio", "0.5"],
                                  ["--ratio", "0.5", "--criterion", "taylor"],
                                  # nothing can be pruned: each was exit 0 with `target_met: true`
                                  ["--ratio", "0.99", "--max-layer-ratio", "0.99", "--round-to", "1"],
                                  ["--ratio", "0.9", "--round-to", "16"],
                                  ["--ratio", "0.5", "--round-to", "1000"],
                                  # was a report of 0.00 % accuracy
                                  ["--ratio", "0.5", "--data", "synthetic", "--eval-batches", "0"],
                                  ["--ratio", "0.5", "--data", "synthetic", "--eval-batches", "-1"]])
def test_bad_requests_fail_cleanly_and_leave_input_untouched(model_file, tmp_path, args, capsys):
    before = file_sha256(model_file)
    rc = main(["prune", model_file, *args, "--no-latency", "-o", str(tmp_path / "o"), "-q"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert file_sha256(model_file) == before
    assert not (tmp_path / "o" / "model.safetensors").exists() and not (tmp_path / "o" / "report.json").exists()


def test_missed_ratio_target_is_reported_as_missed(model_file, tmp_path, capsys, caplog):
    """--ratio 0.97: 16- and 32-wide layers cannot keep int(w * 0.03) >= 1 channel and stay whole."""
    out = tmp_path / "o"
    assert main(["prune", model_file, "--ratio", "0.97", "--max-layer-ratio", "0.99", "--round-to", "1", "--no-latency",
                 "-o", str(out), "-q"]) == 0
    cap = capsys.readouterr()
    assert "TARGET NOT MET" in cap.out
    assert any("kept all their channels" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    rep = json.loads((out / "report.json").read_text())
    res = rep["result"]
    assert res["target_met"] is False and res["uniform_ratio"] == 0.97
    widths = rep["widths"]
    share = 1 - sum(widths["after"].values()) / sum(widths["before"].values())
    assert res["ratio"] < 0.9 and abs(res["ratio"] - share) < 0.1  # measured, not the asked 0.97
    _, info = load_model(out / "model.safetensors")
    assert info.extra["ratio"] == res["ratio"]


def test_report_latency_is_interleaved_and_names_the_device(model_file, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", model_file, "--ratio", "0.5", "--device", "cpu", "-o", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for b in ("1", "64"):
        lb, la = rep["before"]["latency"][b], rep["after"]["latency"][b]
        assert lb["interleaved"] and la["interleaved"] and lb["rounds"] == la["rounds"] >= 3
        assert lb["threads"] == la["threads"] and len(lb["ms_rounds"]) == len(la["ms_rounds"]) == lb["rounds"]
        assert rep["ratios"][f"latency_b{b}"] == la["speedup"]
        per_round = sorted(x / y for x, y in zip(lb["ms_rounds"], la["ms_rounds"]))
        assert per_round[0] <= la["speedup"] <= per_round[-1]
    env = rep["environment"]
    assert env["device"] == "cpu" and env["cuda"] is None


def test_environment_names_the_device_used(monkeypatch):
    import torch

    from metaprune.engine.report import environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU model {i}")
    env = environment("cuda:2")
    assert env["device"] == "cuda:2" and env["device_name"] == env["cuda"] == "GPU model 2"
    assert environment("cpu")["cuda"] is None and environment("cpu")["device"] == "cpu"
    assert "cuda_visible" in environment(None) and environment(None)["cuda"] is None


@pytest.mark.parametrize("args", [["--max-speedup", "nan"], ["--max-speedup", "1"], ["--max-speedup", "inf"],
                                  ["--max-speedup", "0.5"], ["--steps", "0"], ["--val-batches", "-2"]])
def test_bad_curve_options_fail_cleanly(model_file, tmp_path, args, capsys):
    rc = main(["curve", model_file, "--data", "synthetic", *args, "-o", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_refuses_to_overwrite_its_input(model_file, tmp_path):
    before = file_sha256(model_file)
    src_dir = tmp_path / "d"
    src_dir.mkdir()
    src = save_model(load_model(model_file)[0], src_dir)
    assert main(["prune", str(src), "--ratio", "0.5", "--no-latency", "-o", str(src_dir), "-q"]) == 2
    assert file_sha256(model_file) == before


def test_task_option_reaches_spa(model_file, tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    import spa.api as real

    fake = types.ModuleType("spa.api")
    fake.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})  # e.g. AdaptConfig
    fake.adapt_tasks = lambda *a: calls.append(a) or []
    monkeypatch.setitem(sys.modules, "spa.api", fake)
    rc = main(["prune", model_file, "--ratio", "0.4", "--task", "a", "--task", "b", "--method", "sppara",
               "-o", str(tmp_path / "t"), "-q"])
    assert rc == 0 and calls[0][:5] == (model_file, ["a", "b"], "sppara", 0.4, str(tmp_path / "t"))


def test_task_option_writes_one_bundle_per_task(model_file, tmp_path):
    out = tmp_path / "bundles"
    rc = main(["prune", model_file, "--ratio", "0.5", "--task", "synthetic", "--epochs", "1",
               "--max-steps-per-epoch", "1", "--batch-size", "32", "-o", str(out), "-q"])
    assert rc == 0
    cfg = json.loads((out / "synthetic" / "adapter_config.json").read_text())
    assert cfg["method"] == "splora" and (out / "synthetic" / "adapter_model.safetensors").exists()


def test_curve_command(model_file, tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["curve", model_file, "--data", "synthetic", "--max-speedup", "2", "--steps", "2",
               "--val-batches", "1", "--calib-batches", "1", "--batch-size", "64", "-o", str(out), "-q"])
    assert rc == 0
    curve = json.loads((out / "curve.json").read_text())
    assert len(curve["accs"]) >= 3
    assert (out / "curve.png").stat().st_size > 1000
    assert "prunability" in capsys.readouterr().out
