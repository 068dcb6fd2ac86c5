"""``metaprune train`` / ``finetune``: --seed fixes the initial weights (issue 12 item 11), bad numbers
are refused before anything is written (items 11, 12), a folder of another run is not resumed (item 1)."""

from __future__ import annotations

import pytest
import torch

from metaprune.cli import main
from metaprune.io import load_model

QUICK = ["--model", "cifar_resnet20", "--data", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "1",
         "--batch-size", "32", "--train-subset", "128", "--no-augment", "--device", "cpu", "--quiet"]


def _weights(folder):
    return load_model(folder / "model.safetensors")[0].state_dict()


def test_seed_fixes_the_initial_weights(tmp_path):
    for name in "ab":
        assert main(["train", *QUICK, "--seed", "0", "-o", str(tmp_path / name)]) == 0
    a, b = (_weights(tmp_path / n) for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"], ["--momentum", "inf"],
                                 ["--epochs", "0"], ["--epochs", "-1"], ["--batch-size", "0"],
                                 ["--max-steps-per-epoch", "0"], ["--label-smoothing", "nan"]])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, bad):
    out = tmp_path / "out"
    assert main(["train", *QUICK, *bad, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert bad[0].lstrip("-").replace("-", "_") in err
    assert not out.exists()


def test_a_folder_of_another_run_is_refused_and_no_resume_starts_afresh(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "-o", str(out)]) == 0
    first = _weights(out)
    capsys.readouterr()
    assert main(["train", *QUICK, "--lr", "0.05", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.lr: 0.1 -> 0.05" in err and "--no-resume" in err and "Traceback" not in err
    assert all(torch.equal(v, _weights(out)[k]) for k, v in first.items())  # nothing replaced
    assert main(["train", *QUICK, "--lr", "0.05", "--no-resume", "-o", str(out)]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["config"]["lr"] == 0.05  # the checkpoint was replaced


def test_a_run_that_diverges_stops_with_one_error_and_no_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--lr", "1e30", "--schedule", "constant", "--max-steps-per-epoch", "4",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "the loss became" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()


def test_optimizer_flag_reaches_the_run(tmp_path):
    """--optimizer adamw is recorded in the run's resume fingerprint (an SGD rerun into the folder is refused)."""
    vit = ["--model", "vit_tiny_p4", *QUICK[2:], "--optimizer", "adamw", "--lr", "1e-3"]
    out = tmp_path / "vit"
    assert main(["train", *vit, "-o", str(out)]) == 0
    st = torch.load(out / "last.pt", weights_only=True)
    assert '"optimizer": "adamw"' in st["fingerprint"]
    sgd = [a for a in vit if a not in ("--optimizer", "adamw")]
    assert main(["train", *sgd, "-o", str(out)]) == 2  # another run: refused, nothing overwritten
