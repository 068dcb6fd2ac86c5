"""The command line: one clear error line and exit 2 on bad input, nothing half-written, inputs untouched."""

import json

import pytest
import torch

from metaprune import create_model, list_models
from metaprune.cli import main
from metaprune.io import file_sha256, save_model


@pytest.fixture
def model_file(tmp_path, tiny_resnet):
    return str(save_model(tiny_resnet, tmp_path / "in" / "model.safetensors"))


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_list_models_prints_every_architecture(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())


def test_unknown_model_and_dataset(tmp_path, capsys):
    assert main(["train", "--model", "resnet9000", "-o", str(tmp_path / "x")]) == 2
    assert "valid names" in _err(capsys)
    assert main(["train", "--model", "cifar_resnet20", "--data", "mnist-typo", "-o", str(tmp_path / "x")]) == 2
    assert "fashion-mnist" in _err(capsys)
    assert not (tmp_path / "x").exists()


def test_truncated_model_file(tmp_path, model_file, capsys):
    data = open(model_file, "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    assert main(["eval", str(bad), "--data", "synthetic", "--no-latency"]) == 2
    assert "truncated or corrupt" in _err(capsys)


@pytest.mark.data
def test_wrong_channels_for_the_data(tmp_path, capsys):
    p = save_model(create_model("cifar_resnet20", num_classes=10, in_chans=3), tmp_path / "rgb.safetensors")
    assert main(["eval", str(p), "--data", "fashion-mnist", "--no-latency"]) == 2
    assert "3-channel" in _err(capsys)


def test_unmatched_state_dict(tmp_path, capsys):
    torch.save({"w": torch.zeros(3)}, tmp_path / "odd.pt")
    assert main(["convert", str(tmp_path / "odd.pt")]) == 2
    err = _err(capsys)
    assert "matches no registered" in err and "pass --arch" in err and err.count("error:") == 1, err


def test_output_that_is_the_input_is_refused(model_file, capsys):
    before = file_sha256(model_file)
    rc = main(["finetune", model_file, "--data", "synthetic", "--epochs", "1", "-o", str(model_file.rsplit("/", 1)[0])])
    assert rc == 2 and "overwrite the input" in _err(capsys)
    assert file_sha256(model_file) == before


def test_output_below_a_file_is_refused(tmp_path, model_file, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(["finetune", model_file, "--data", "synthetic", "--epochs", "1", "-o", str(tmp_path / "afile" / "o")])
    assert rc == 2 and "cannot create" in _err(capsys)


def test_eval_prints_accuracy_params_macs_latency(model_file, capsys):
    assert main(["eval", model_file, "--data", "synthetic", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"test_acc", "params", "macs", "latency"} <= set(r) and r["params"] == 272_186


def test_config_preset_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("train:\n  model: cifar_resnet20\n  epochs: 1\n  lr: 0.02\n  max_steps_per_epoch: 1\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", "synthetic", "--lr", "0.03", "-o", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["epochs"] == 1 and rep["config"]["lr"] == 0.03
    cfg.write_text("train:\n  modle: cifar_resnet20\n")
    assert main(["train", "--config", str(cfg), "-o", str(out)]) == 2
    assert "modle" in _err(capsys)
