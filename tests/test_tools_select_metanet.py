"""tools/select_metanet.py: selects by validation accuracy after the finetune, never test accuracy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("select_tool", Path(__file__).parents[1] / "tools" / "select_metanet.py")
sel = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sel)


def _write(folder: Path, arm: str, values: dict[str, tuple[float, float, float]], ckpt: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fp = {"metanet": {"path": str(ckpt), "sha256": sel.sha256_path(ckpt)}} if ckpt is not None else {}
    for member, (ft_val, ft_test, val) in values.items():
        f = folder / f"zoo_val__{member}.json"
        rec = json.loads(f.read_text()) if f.exists() else {"arms": {}}
        rec["arms"][f"{arm}@3x"] = {"ft_val_acc": ft_val, "ft_test_acc": ft_test, "val_acc": val, "fingerprint": fp}
        f.write_text(json.dumps(rec))


def _ckpt(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "ckpt" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"name": name}))
    return d


def test_chooses_by_validation_after_finetune_and_pairs_vs_functional(tmp_path):
    out = tmp_path / "sel.json"
    base = tmp_path / "sel_baselines_members"
    _write(base, "l2", {"m0": (80, 80, 30), "m1": (79, 79, 35)})
    _write(base, "functional", {"m0": (81, 81, 40), "m1": (80, 80, 45)})
    # "a" is better on validation, "b" would win on test accuracy: only validation may select
    ca, cb = _ckpt(tmp_path, "a"), _ckpt(tmp_path, "b")
    _write(tmp_path / "sel_a_members", "metanet", {"m0": (81.6, 80.0, 50), "m1": (80.8, 79.0, 52)}, ca)
    _write(tmp_path / "sel_b_members", "metanet", {"m0": (81.2, 90.0, 60), "m1": (80.9, 90.0, 62)}, cb)
    s = sel.summarize(out, {"a": str(ca), "b": str(cb)}, "3x")
    assert s["chosen"] == "a"
    r = s["rows"]["a"]
    assert r["ft_val_acc"] == pytest.approx(81.2) and r["val_acc"] == pytest.approx(51)
    assert r["vs_functional"]["mean"] == pytest.approx(0.7) and r["vs_functional"]["wins"] == 2
    lead = s["chosen_vs_runner_up"]
    assert lead["runner_up"] == "b" and lead["lead"]["mean"] == pytest.approx(0.15)
    assert lead["resolved"] is False  # +0.4 and -0.1: SE 0.25, the lead is within 2 SE
    assert s["rows"]["l2"]["ft_val_acc"] == pytest.approx(79.5)


def test_results_of_another_checkpoint_under_a_candidate_s_name_are_refused(tmp_path):
    """--summary-only after pointing a candidate name at another checkpoint: its old results are not its own."""
    out = tmp_path / "sel.json"
    _write(tmp_path / "sel_baselines_members", "functional", {"m0": (81, 81, 40)})
    old, new = _ckpt(tmp_path, "old"), _ckpt(tmp_path, "new")
    _write(tmp_path / "sel_a_members", "metanet", {"m0": (81.6, 80.0, 50)}, old)
    with pytest.raises(SystemExit, match="made with another checkpoint"):
        sel.summarize(out, {"a": str(new)}, "3x")
    assert sel.summarize(out, {"a": str(old)}, "3x")["chosen"] == "a"
