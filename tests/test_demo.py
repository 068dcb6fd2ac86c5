"""`metaprune demo --fast` end to end on synthetic data: outputs exist, reload, and the table matches the reports."""

import json
from pathlib import Path

import pytest

from metaprune.cli import main
from metaprune.cli.common import DEFAULT_METANET, DEFAULT_MODEL


@pytest.mark.skipif(not (DEFAULT_MODEL.exists() and DEFAULT_METANET.exists()), reason="shipped checkpoints missing")
def test_demo_fast_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--data", "synthetic", "--device", "cpu", "-o", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "synthetic" in report["data"] and "synthetic" in table
    assert [r["name"] for r in report["rows"]][:4] == ["source", "edited", "pruned_2x", "pruned_3x"]
    assert sum(r["kind"] == "bundle" for r in report["rows"]) == 2
    assert (out / "curves.png").stat().st_size > 1000

    from metaprune.graph import Graph
    from metaprune.io import load_model

    assert Graph.load(out / "graph.safetensors").num_nodes > 0
    for r in report["rows"]:
        line = next(ln for ln in table.splitlines() if ln.startswith(r["name"]))
        assert f"{r['params']:,d}" in line and f"{r['macs'] / 1e6:.2f}" in line and f"{r['acc']:.2f}%" in line
        sub = json.loads(Path(r["report"]).read_text()) if r["report"].endswith(".json") else None
        if r["kind"] == "model":
            model, _ = load_model(r["path"])
            assert sum(p.numel() for p in model.parameters()) == r["params"]
            if sub is not None:
                assert sub["model"]["params"] == r["params"] and sub["model"]["macs"] == r["macs"]
                assert sub["model"]["test_acc"] == pytest.approx(r["acc"])
        else:
            assert sub["test_acc"] == pytest.approx(r["acc"]) and sub["macs"]["pruned"] == r["macs"]
            assert (Path(r["path"]) / "adapter_model.safetensors").exists()
            merged = out / f"merged_{Path(r['path']).name}.safetensors"
            model, _ = load_model(merged)
            assert sum(p.numel() for p in model.parameters()) == sub["params"]["pruned"]
    # latency: every model of the table timed together (interleaved rounds, one thread count), and each
    # sub-report holds that same measurement
    lat = report["latency"]
    assert lat["interleaved"] and lat["rounds"] >= 1 and lat["reference"] == "source"
    assert set(lat["ratios"]) == {r["name"] for r in report["rows"]}
    for r in report["rows"]:
        assert r["latency_speedup_b1"] == lat["ratios"][r["name"]]
        line = next(ln for ln in table.splitlines() if ln.startswith(r["name"]))
        assert f"{r['latency_ms_b1']:.2f}" in line and f"{r['latency_speedup_b1']:.2f}x" in line
        if r["kind"] == "model" and r["report"].endswith(".json"):
            sub = json.loads(Path(r["report"]).read_text())["model"]["latency"]["1"]
            assert sub["ms"] == r["latency_ms_b1"] and sub["interleaved"] and sub["threads"] == lat["threads"]
    assert next(r for r in report["rows"] if r["name"] == "source")["latency_speedup_b1"] == 1.0
    assert "interleaved" in table
    assert report["environment"]["device"] == "cpu"
    # L2 vs functional (prune's default) vs gate vs ranking metanetwork at the largest speed-up, each at the
    # target, in the table
    crit = report["criteria"]
    assert list(crit) == ["l2", "functional", "gate", "metanet", "functional+reconstruct"]
    line = next(ln for ln in table.splitlines() if ln.startswith("channel choice"))
    for k, v in crit.items():
        assert v["mac_speedup"] == pytest.approx(3.0, rel=0.03) and f"{k} {v['test_acc']:.2f}%" in line
    assert crit["gate"]["seconds"] > crit["l2"]["seconds"]
    for sp in ("2x", "3x"):  # pruned with prune's defaults given training data: the refit ran
        rec = json.loads((out / f"pruned_{sp}_report.json").read_text())["reconstruct"]
        assert rec["auto"] is True and rec["layers"] > 0 and rec["rel_err_after"] <= rec["rel_err_before"]
    pruned = {r["name"]: r for r in report["rows"]}
    assert pruned["pruned_3x"]["macs"] < pruned["pruned_2x"]["macs"] < pruned["source"]["macs"]


def test_report_command_prints_the_demo_table(tmp_path, capsys):
    report = {"command": "demo", "data": "synthetic (synthetic)", "eval": "test split", "seconds": 1.0,
              "rows": [{"name": "source", "acc": 50.0, "params": 10, "macs": 2e6, "latency_ms_b1": 1.0, "bytes": 99}],
              "curves": {"original": {"speedups": [1, 3], "auc": 40.0}, "edited": {"speedups": [1, 3], "auc": 41.0}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "source" in out and "50.00%" in out and "edited 41.00" in out
