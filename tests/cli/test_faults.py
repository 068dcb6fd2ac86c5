"""Faults: a full disk gives one clear error line and leaves no partial file behind; late checks
(demo's metanetwork and tasks) happen before any work."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from metaprune.cli import main
from metaprune.io import save_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from metaprune import create_model

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    m = save_model(create_model("cifar_resnet20", num_classes=10, in_chans=1).eval(), root / "m.safetensors")
    g = root / "g.safetensors"
    assert main(["convert", str(m), "-o", str(g), "-q"]) == 0
    b = root / "b"
    assert main(["adapt", str(m), "--task", "synthetic", "--steps", "1", "--warmup-epochs", "0", "--recovery-epochs",
                 "1", "--max-steps-per-epoch", "1", "--min-steps", "0", "--device", "cpu", "-o", str(b), "-q"]) == 0
    return {"m": m, "g": g, "b": b}


FAST = "--device cpu -q"
WRITING = {
    "train": "train --model cifar_resnet20 --data synthetic --epochs 1 --max-steps-per-epoch 1 -o {o}",
    "finetune": "finetune {m} --data synthetic --epochs 1 --max-steps-per-epoch 1 -o {o}",
    "prune": "prune {m} --ratio 0.5 --no-latency -o {o}",
    "curve": "curve {m} --data synthetic --steps 1 --val-batches 1 --calib-batches 1 -o {o}",
    "convert": "convert {m} -o {o}/g.safetensors",
    "convert-to-model": "convert {g} --to-model -o {o}/m.safetensors",
    "transform": "transform {m} --data synthetic --calib-batches 0 -o {o}/e.safetensors",
    "merge": "merge {b} --source {m} -o {o}/merged.safetensors",
    "export": "export {m} -o {o}/m.onnx",
}


def _run(cmd: str, inputs: dict, out: Path, capsys) -> tuple[int, str]:
    argv = cmd.format(o=out, **inputs).split() + FAST.split()
    rc = main(argv)
    return rc, capsys.readouterr().err


def _left(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.fixture
def full_disk():
    """Files may grow to 1 byte at most (RLIMIT_FSIZE; writes fail with EFBIG as on a full disk)."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    class Limit:
        def __enter__(self):
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, old[1]))

        def __exit__(self, *exc):
            resource.setrlimit(resource.RLIMIT_FSIZE, old)

    yield Limit()
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, old_sig)


@pytest.mark.parametrize("verb", sorted(WRITING))
def test_full_disk_one_error_no_partial_file(inputs, tmp_path, capsys, full_disk, verb):
    out = tmp_path / "out"
    with full_disk:
        rc, err = _run(WRITING[verb], inputs, out, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "File too large" in errors[0] or "could not write" in errors[0], errors[0]
    assert _left(out) == [], _left(out)  # no model, no report, no curve.json, no .tmp


@pytest.mark.parametrize("verb,nth", [("curve", 2), ("prune", 2), ("train", 3), ("merge", 1)])
def test_a_late_write_error_removes_the_outputs_already_written(inputs, tmp_path, capsys, monkeypatch, verb, nth):
    """The nth output fails (ENOSPC when it is renamed into place): the outputs written before it go
    too, except a resume checkpoint (train keeps last.pt so that a rerun resumes)."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    rc, err = _run(WRITING[verb], inputs, out, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "No space left on device" in errors[0], err
    assert len(calls) == nth
    assert _left(out) == (["last.pt"] if verb == "train" else []), _left(out)


def test_demo_checks_metanetwork_and_tasks_before_any_work(inputs, tmp_path, capsys):
    out = tmp_path / "demo"
    rc, err = _run("demo {m} --metanet {o}/nonexistent -o {o}/demo", inputs, tmp_path, capsys)
    assert rc == 2 and "not a metanetwork folder" in err and not out.exists(), err
    rc, err = _run("demo {m} --task bogus -o {o}/demo", inputs, tmp_path, capsys)
    assert rc == 2 and "bogus" in err and not out.exists(), err
