"""`metaprune export`: ONNX (checked with onnxruntime), TorchScript and torch.export, dynamic batch,
a failed check leaves no file, a missing extra is named."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from metaprune.cli import main

ort = pytest.importorskip("onnxruntime")


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights and BatchNorm statistics (zero-initialised heads would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def pruned_resnet_file(tmp_path_factory):
    from metaprune import create_model
    from metaprune.io import save_model
    from metaprune.pruning import PruneConfig, prune

    torch.manual_seed(0)
    model = _randomise(create_model("cifar_resnet20", num_classes=10, in_chans=1))
    pruned = prune(model, PruneConfig(ratio=0.4), input_shape=(1, 16, 16)).model.eval()
    assert pruned.layer1[0].conv1.out_channels < 16  # really pruned (odd widths reach the exporter)
    p = tmp_path_factory.mktemp("m") / "pruned.safetensors"
    save_model(pruned, p)
    return p, pruned


def _ort_run(path, x: torch.Tensor) -> torch.Tensor:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def test_onnx_of_a_pruned_resnet_matches_onnxruntime_at_any_batch(tmp_path, pruned_resnet_file, capsys):
    src, model = pruned_resnet_file
    out = tmp_path / "sub" / "model.onnx"
    assert main(["export", str(src), "-o", str(out), "--input-shape", "1,16,16", "--json", "-q"]) == 0
    rep = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "sub" / "model.export.json").read_text())
    assert saved["max_abs_diff"] == rep["max_abs_diff"] <= 1e-5
    assert rep["output_max_abs"] > 1 and rep["allowed_abs_diff"] == pytest.approx(1e-4 * rep["output_max_abs"])
    assert (rep["format"], rep["opset"], rep["input_shape"]) == ("onnx", 17, [1, 16, 16])
    assert set(rep["max_abs_diff_per_batch"]) == {"1", "3"}
    # an independent check, at batch sizes the export never saw: the batch dimension is dynamic
    for b in (1, 7):
        x = torch.randn(b, 1, 16, 16)
        with torch.no_grad():
            ref = model(x)
        got = _ort_run(out, x)
        assert got.shape == (b, 10)
        assert (got - ref).abs().max() <= 1e-5
        assert ref.abs().max() > 0.1  # a real comparison, not of two zero tensors
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["model.export.json", "model.onnx"]


def test_onnx_of_a_pruned_vit_matches_onnxruntime(tmp_path):
    from metaprune import create_model
    from metaprune.export import export_model
    from metaprune.pruning import PruneConfig, prune

    torch.manual_seed(0)
    vit = _randomise(create_model("vit_tiny_p4", num_classes=10, image_size=16))
    vit = prune(vit, PruneConfig(ratio=0.3), input_shape=(3, 16, 16)).model.eval()
    out = tmp_path / "vit.onnx"
    rep = export_model(vit, out, "onnx", (3, 16, 16))
    assert rep["max_abs_diff"] <= 1e-5
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
    assert (_ort_run(out, x) - ref).abs().max() <= 1e-5
    assert ref.std() > 0.1


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".pt"), ("export", ".pt2")])
def test_torchscript_and_torch_export_reload_with_the_same_outputs(tmp_path, pruned_resnet_file, fmt, suffix):
    from metaprune.export import load_exported

    src, model = pruned_resnet_file
    out = tmp_path / f"m{suffix}"  # the format follows the suffix
    assert main(["export", str(src), "-o", str(out), "--input-shape", "1,16,16", "-q"]) == 0
    rep = json.loads((tmp_path / "m.export.json").read_text())
    assert rep["format"] == fmt and rep["max_abs_diff"] <= 1e-5
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        assert (load_exported(out, fmt)(x) - model(x)).abs().max() <= 1e-5


def test_a_mismatch_above_the_tolerance_fails_and_leaves_no_file(tmp_path, pruned_resnet_file, monkeypatch, capsys):
    from metaprune import export

    src, _ = pruned_resnet_file
    real = export.OrtModule.forward
    monkeypatch.setattr(export.OrtModule, "forward", lambda self, x: real(self, x) * 1.01)  # 1 % off
    out = tmp_path / "model.onnx"
    assert main(["export", str(src), "-o", str(out), "--input-shape", "1,16,16", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "max abs diff" in err[0] and "> tolerance 0.0001" in err[0]
    assert list(tmp_path.iterdir()) == []  # no model.onnx, no report, no temporary file
    # a looser tolerance accepts the same difference
    assert main(["export", str(src), "-o", str(out), "--input-shape", "1,16,16", "-q", "--tolerance", "0.02"]) == 0
    assert out.exists()


def test_missing_onnxruntime_names_the_extra(tmp_path, pruned_resnet_file, monkeypatch, capsys):
    src, _ = pruned_resnet_file
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "model.onnx"
    assert main(["export", str(src), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install metaprune[export]" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_one_error_line_and_the_input_is_kept(tmp_path, pruned_resnet_file, capsys):
    src, _ = pruned_resnet_file
    before = src.read_bytes()
    for argv in (["-o", str(src)],  # would overwrite the input
                 ["-o", str(tmp_path / "m.onnx"), "--input-shape", "3,x"],
                 ["-o", str(tmp_path / "m.onnx"), "--input-shape", "3,16,16"],  # the model takes 1 channel
                 ["-o", str(tmp_path / "m.pt"), "--opset", "13"],
                 ["-o", str(tmp_path / "m.onnx"), "--tolerance", "nan"]):
        assert main(["export", str(src), *argv, "-q"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
    assert src.read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_latency_against_a_baseline_is_interleaved(tmp_path, pruned_resnet_file):
    from metaprune.export import export_latency

    src, model = pruned_resnet_file
    out = tmp_path / "m.onnx"
    assert main(["export", str(src), "-o", str(out), "--input-shape", "1,16,16", "-q"]) == 0
    from metaprune import create_model

    base = _randomise(create_model("cifar_resnet20", num_classes=10, in_chans=1))
    lat = export_latency(model, out, "onnx", (1, 16, 16), baseline=base, batches=(2,), rounds=2, repeats=1, warmup=1)
    e = lat["batches"]["2"]
    assert set(e["ms"]) == {"pytorch_baseline", "onnxruntime_baseline", "pytorch", "onnxruntime"}
    assert all(len(v) == 2 for v in e["ms_rounds"].values()) and e["interleaved"]
    assert set(e["speedup"]) == {"pytorch", "onnxruntime"} and all(v > 0 for v in e["speedup"].values())
    assert lat["threads"] == 1 and lat["provider"] == "CPUExecutionProvider"
    assert lat["baseline_max_abs_diff"] <= 1e-4


def test_spa_bundle_with_source_exports_the_merged_model(tmp_path, capsys):
    """An SPA bundle folder + --source is merged, then exported: ONNX == the merged model; and a bundle
    without --source is refused with one error line."""
    from metaprune import create_model
    from metaprune.io import save_model, state_dict_sha256
    from spa import adapt_model, merge, save_bundle
    from spa.adapt import _NORMS
    from spa.masks import step_keep
    from spa.methods import get_method
    from spa.prune import apply_masks, build_graph, channel_groups, layer_masks

    torch.manual_seed(0)
    src = _randomise(create_model("cifar_resnet20", num_classes=10, in_chans=1))
    src_path = save_model(src, tmp_path / "src.safetensors")
    cfg_cls, _ = get_method("splora")
    m = adapt_model(src, "splora", cfg_cls(rank=2), num_classes=4, seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    groups = channel_groups(m, build_graph(m, torch.zeros(1, 1, 16, 16)), m.get_submodule(m.spa_head))
    lm = layer_masks(m, groups, step_keep(m, groups, 0.5))
    apply_masks(m, lm)
    mods = dict(m.named_modules())
    m.spa_norm_masks = {n: d["out"] for n, d in lm.items() if isinstance(mods[n], _NORMS)}
    bundle = save_bundle(m, tmp_path / "bundle", method="splora", method_config=cfg_cls(rank=2), task="t",
                         classes=list("abcd"), source_sha256=state_dict_sha256(src), input_shape=(1, 16, 16))
    out = tmp_path / "out" / "b.onnx"
    assert main(["export", str(bundle), "-o", str(out), "-q"]) == 2
    assert "--source" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(bundle), "--source", str(src_path), "-o", str(out), "--input-shape", "1,16,16",
                 "-q"]) == 0
    merged = merge(bundle, src.eval()).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        ref = merged(x)
    assert ref.shape == (5, 4)
    assert (_ort_run(out, x) - ref).abs().max() <= 1e-5


@pytest.fixture
def small_latency(monkeypatch):
    """prune's latency at batches 1 and 4 in 3 rounds (the default 1 and 64 in 5 rounds is slow for the suite)."""
    import functools

    from metaprune.pruning import pipeline, report

    monkeypatch.setattr(pipeline, "add_latency", functools.partial(report.add_latency, batches=(1, 4), rounds=3))


def test_prune_report_has_onnxruntime_latency_interleaved_with_torch(tmp_path, small_latency, capsys):
    """--latency-runtime torch,onnxruntime: onnxruntime before/after in report.json, timed in the same rounds
    as PyTorch; the ratios are the medians of the per-round ratios; without the flag no onnxruntime key."""
    import statistics

    from metaprune import create_model
    from metaprune.io import save_model

    torch.manual_seed(0)
    src = save_model(create_model("cifar_resnet20", num_classes=10, in_chans=1).eval(), tmp_path / "src.safetensors")
    out = tmp_path / "o"
    assert main(["prune", str(src), "--ratio", "0.4", "--latency-runtime", "torch,onnxruntime", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "onnxruntime batch 4" in table and "CPUExecutionProvider" in table
    rep = json.loads((out / "report.json").read_text())
    b, a, r = rep["before"], rep["after"], rep["ratios"]
    assert set(b["latency_onnxruntime"]) == set(a["latency_onnxruntime"]) == set(b["latency"]) == {"1", "4"}
    med = statistics.median
    for bs in ("1", "4"):
        ob, oa, tb, ta = b["latency_onnxruntime"][bs], a["latency_onnxruntime"][bs], b["latency"][bs], a["latency"][bs]
        assert oa["runtime"] == "onnxruntime" and ta["runtime"] == "torch"
        assert oa["provider"] == "CPUExecutionProvider" and oa["max_abs_diff_after"] <= 1e-4
        # the same interleaved rounds and threads as PyTorch
        assert len(ob["ms_rounds"]) == len(oa["ms_rounds"]) == len(ta["ms_rounds"]) == 3
        assert oa["threads"] == ta["threads"] and oa["batch"] == int(bs) and oa["interleaved"]
        assert oa["ms"] == pytest.approx(med(oa["ms_rounds"]), rel=1e-5)
        # before / after in onnxruntime: the median of the per-round ratios, in the report and its ratios
        want = med(x / y for x, y in zip(ob["ms_rounds"], oa["ms_rounds"]))
        assert oa["speedup"] == pytest.approx(want, rel=1e-4) and r[f"latency_onnxruntime_b{bs}"] == oa["speedup"]
        assert r[f"latency_per_mac_onnxruntime_b{bs}"] == pytest.approx(oa["speedup"] / r["macs"])
        assert oa["speedup_over_torch"] == pytest.approx(med(x / y for x, y in zip(ta["ms_rounds"], oa["ms_rounds"])),
                                                         rel=1e-4)
        assert ob["speedup_over_torch"] == pytest.approx(med(x / y for x, y in zip(tb["ms_rounds"], ob["ms_rounds"])),
                                                         rel=1e-4)
        assert r[f"latency_b{bs}"] == ta["speedup"]  # PyTorch's ratio unchanged
    # default: PyTorch only, no onnxruntime key anywhere
    out2 = tmp_path / "o2"
    assert main(["prune", str(src), "--ratio", "0.4", "-o", str(out2), "-q"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert "latency_onnxruntime" not in rep2["before"] and "latency_onnxruntime" not in rep2["after"]
    assert set(rep2["before"]["latency"]) == {"1", "4"} and not any("onnxruntime" in k for k in rep2["ratios"])


def test_prune_latency_runtime_bad_values_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from metaprune import create_model
    from metaprune.io import save_model

    src = save_model(create_model("cifar_resnet20", num_classes=10, in_chans=1).eval(), tmp_path / "src.safetensors")
    out = tmp_path / "o"
    for flags, says in ((["--latency-runtime", "tensorrt"], "tensorrt"),
                        (["--latency-runtime", "torch,onnxruntime", "--no-latency"], "--no-latency")):
        assert main(["prune", str(src), "--ratio", "0.4", *flags, "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --latency-runtime") and says in err[0], err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["prune", str(src), "--ratio", "0.4", "--latency-runtime", "torch,onnxruntime", "-o", str(out),
                 "-q"]) == 2
    assert "pip install metaprune[export]" in capsys.readouterr().err
    assert not out.exists()
