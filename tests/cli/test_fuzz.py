"""Fuzzing the file readers: every verb that reads a file gets a table of damaged files.

Each (verb x damaged file) case must end with exit status 2, exactly one ``error:`` line on
stderr, no traceback, nothing written and the damaged input unchanged. The CLI runs in-process
on tiny models, so the whole table takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metaprune import create_model
from metaprune.cli import main
from metaprune.cli.common import DEFAULT_METANET
from metaprune.io import META_KEY, file_sha256, save_model


# ----------------------------------------------------------------------------- safetensors surgery
def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def _meta(key: str, edit):
    """Rewrite one metadata entry: ``edit(parsed JSON) -> new JSON value`` (or a raw string)."""
    def f(src: Path, dst: Path) -> None:
        header, data = _split(src.read_bytes())
        value = edit(json.loads(header["__metadata__"][key]))
        header["__metadata__"][key] = value if isinstance(value, str) else json.dumps(value)
        dst.write_bytes(_join(header, data))
    return f


def _tensors(edit):
    """Rewrite the tensors: ``edit(dict) -> dict`` (metadata kept)."""
    def f(src: Path, dst: Path) -> None:
        header, _ = _split(src.read_bytes())
        save_file(edit(dict(load_file(str(src)))), str(dst), metadata=header.get("__metadata__"))
    return f


def _bytes(edit):
    def f(src: Path, dst: Path) -> None:
        dst.write_bytes(edit(src.read_bytes()))
    return f


def _huge_header(raw: bytes) -> bytes:
    return (1 << 62).to_bytes(8, "little") + raw[8:]


def _bad_header(raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    return raw[:8] + b"{" * n + raw[8 + n:]


def _set(d: dict, path: str, value) -> dict:
    *keys, last = path.split(".")
    cur = d
    for k in keys:
        cur = cur[k]
    if value is _DELETE:
        del cur[last]
    else:
        cur[last] = value
    return d


_DELETE = object()


def _first(sd: dict, suffix: str) -> str:
    return next(k for k in sorted(sd) if k.endswith(suffix))


def _poke(value: float, suffix: str = "weight"):
    def edit(sd):
        k = _first(sd, suffix)
        t = sd[k].clone()
        t.view(-1)[0] = value
        return {**sd, k: t}
    return edit


# damage shared by every safetensors file
def _file_damage() -> dict:
    return {
        "truncated": _bytes(lambda b: b[: len(b) // 2]),
        "empty": _bytes(lambda b: b""),
        "garbage": _bytes(lambda b: bytes(range(256)) * 8),
        "huge-header-size": _bytes(_huge_header),
        "header-not-json": _bytes(_bad_header),
    }


def _not_a_file(src: Path, dst: Path) -> None:
    dst.mkdir()
    (dst / "something.txt").write_text("x")


def _missing(src: Path, dst: Path) -> None:
    pass


MODEL_DAMAGE = {
    **_file_damage(),
    "metadata-list": _meta(META_KEY, lambda s: [s]),
    "metadata-string": _meta(META_KEY, lambda s: "model"),
    "metadata-not-json": _meta(META_KEY, lambda s: "{arch: resnet"),
    "no-arch": _meta(META_KEY, lambda s: _set(s, "arch", _DELETE)),
    "unknown-arch": _meta(META_KEY, lambda s: _set(s, "arch", "resnet9000")),
    "arch-not-string": _meta(META_KEY, lambda s: _set(s, "arch", ["cifar_resnet20"])),
    "format-version-string": _meta(META_KEY, lambda s: _set(s, "format_version", "1")),
    "format-version-float": _meta(META_KEY, lambda s: _set(s, "format_version", 1.5)),
    "format-version-future": _meta(META_KEY, lambda s: _set(s, "format_version", 99)),
    "arch-args-list": _meta(META_KEY, lambda s: _set(s, "arch_args", [10, 1])),
    "num-classes-string": _meta(META_KEY, lambda s: _set(s, "arch_args.num_classes", "ten")),
    "unknown-arch-arg": _meta(META_KEY, lambda s: _set(s, "arch_args.depth", 3)),
    "widths-list": _meta(META_KEY, lambda s: _set(s, "widths", [16, 32])),
    "widths-disagree-with-shapes": _meta(META_KEY, lambda s: _set(s, "widths.conv1.out_channels", 8)),
    "widths-negative": _meta(META_KEY, lambda s: _set(s, "widths.bn1.num_features", -16)),
    "widths-float": _meta(META_KEY, lambda s: _set(s, "widths.bn1.num_features", 16.0)),
    "widths-unknown-layer": _meta(META_KEY, lambda s: _set(s, "widths.nolayer", {"num_features": 3})),
    "widths-padding-mode": _meta(META_KEY, lambda s: _set(s, "widths.conv1.padding_mode", "reflect")),
    "widths-dilation": _meta(META_KEY, lambda s: _set(s, "widths.conv1.dilation", [2, 2])),
    "widths-eps": _meta(META_KEY, lambda s: _set(s, "widths.bn1.eps", 1.0)),
    "shape-mismatch": _tensors(lambda sd: {**sd, "conv1.weight": torch.zeros(8, 1, 3, 3)}),
    "layers-do-not-connect": _tensors(lambda sd: {**sd, "layer1.0.conv2.weight": torch.zeros(16, 8, 3, 3)}),
    "wrong-rank-tensor": _tensors(lambda sd: {**sd, "fc.weight": torch.zeros(640)}),
    "missing-tensor": _tensors(lambda sd: {k: v for k, v in sd.items() if k != "fc.bias"}),
    "extra-tensor": _tensors(lambda sd: {**sd, "extra.weight": torch.zeros(3)}),
    "nan-weight": _tensors(_poke(float("nan"))),
    "inf-running-var": _tensors(_poke(float("inf"), "running_var")),
    "folder-without-model": _not_a_file,
    "missing": _missing,
}
PT_DAMAGE = {
    "pt-empty": lambda src, dst: dst.write_bytes(b""),
    "pt-truncated": lambda src, dst: (torch.save(load_file(str(src)), dst),
                                      dst.write_bytes(dst.read_bytes()[:1000])),
    "pt-list": lambda src, dst: torch.save([1, 2, 3], dst),
    "pt-no-tensors": lambda src, dst: torch.save({"epoch": 3, "lr": 0.1}, dst),
    "pt-nan": lambda src, dst: torch.save(_poke(float("nan"))(load_file(str(src))), dst),
    "pt-bad-shapes": lambda src, dst: torch.save({**load_file(str(src)), "conv1.weight": torch.zeros(3)}, dst),
}


def _graph_spec(edit):
    def e(s):
        edit(s["spec"])
        return s
    return _meta("metaprune_graph", e)


GRAPH_DAMAGE = {
    **_file_damage(),
    "metadata-list": _meta("metaprune_graph", lambda s: [s]),
    "metadata-not-json": _meta("metaprune_graph", lambda s: "{spec"),
    "no-spec": _meta("metaprune_graph", lambda s: _set(s, "spec", _DELETE)),
    "spec-without-layout": _graph_spec(lambda sp: sp.pop("layout")),
    "spec-layout-not-list": _graph_spec(lambda sp: sp.update(layout={"a": 1})),
    "spec-unknown-arch": _graph_spec(lambda sp: sp.update(arch="resnet9000")),
    "spec-widths-padding-mode": _graph_spec(lambda sp: sp["widths"]["conv1"].update(padding_mode="reflect")),
    "format-version-string": _meta("metaprune_graph", lambda s: _set(s, "format_version", "1")),
    "nan-node-features": _tensors(lambda sd: {**sd, "x": torch.full_like(sd["x"], float("nan"))}),
    "short-node-features": _tensors(lambda sd: {**sd, "x": sd["x"][:, :3].contiguous()}),
    "few-nodes": _tensors(lambda sd: {**sd, "x": sd["x"][:10].contiguous()}),
    "edge-index-out-of-range": _tensors(lambda sd: {**sd, **{k: v + 10**6 for k, v in sd.items()
                                                             if k.endswith(".index")}}),
    "missing-tensor": _tensors(lambda sd: {k: v for k, v in sd.items() if k != "x_mask"}),
    "folder": _not_a_file,
    "missing": _missing,
}


def _in_folder(name: str, damage):
    """Damage one file of a folder (a metanetwork or a bundle)."""
    def f(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst)
        tmp = dst / (name + ".orig")
        (dst / name).rename(tmp)
        damage(tmp, dst / name)
        tmp.unlink()
    return f


def _json_file(edit):
    def f(src: Path, dst: Path) -> None:
        v = edit(json.loads(src.read_text()))
        dst.write_text(v if isinstance(v, str) else json.dumps(v))
    return f


def _drop(name: str):
    def f(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst)
        (dst / name).unlink()
    return f


def _file_instead(src: Path, dst: Path) -> None:
    dst.write_text("not a folder")


METANET_DAMAGE = {
    **{f"weights-{k}": _in_folder("metanet.safetensors", v) for k, v in _file_damage().items()},
    "weights-nan": _in_folder("metanet.safetensors", _tensors(_poke(float("nan")))),
    "weights-missing-tensor": _in_folder("metanet.safetensors", _tensors(lambda sd: dict(list(sd.items())[1:]))),
    "weights-wrong-shape": _in_folder("metanet.safetensors", _tensors(
        lambda sd: {**sd, _first(sd, "weight"): torch.zeros(3, 3)})),
    "config-not-json": _in_folder("config.json", _bytes(lambda b: b[: len(b) // 2])),
    "config-empty": _in_folder("config.json", _bytes(lambda b: b"")),
    "config-list": _in_folder("config.json", _json_file(lambda c: [c])),
    "config-no-metanet": _in_folder("config.json", _json_file(lambda c: _set(c, "metanet", _DELETE))),
    "config-metanet-string": _in_folder("config.json", _json_file(lambda c: _set(c, "metanet", "big"))),
    "config-hidden-string": _in_folder("config.json", _json_file(lambda c: _set(c, "metanet.hidden", "32"))),
    "config-hidden-negative": _in_folder("config.json", _json_file(lambda c: _set(c, "metanet.hidden", -4))),
    "config-unknown-key": _in_folder("config.json", _json_file(lambda c: _set(c, "metanet.colour", "red"))),
    "config-format-version-string": _in_folder("config.json", _json_file(lambda c: _set(c, "format_version", "1"))),
    "no-weights": _drop("metanet.safetensors"),
    "no-config": _drop("config.json"),
    "a-file": _file_instead,
    "missing": _missing,
}

BUNDLE_DAMAGE = {
    **{f"weights-{k}": _in_folder("adapter_model.safetensors", v) for k, v in _file_damage().items()},
    "weights-nan": _in_folder("adapter_model.safetensors", _tensors(lambda sd: {
        k: (v.float().fill_(float("nan")).to(v.dtype) if v.is_floating_point() else v) for k, v in sd.items()})),
    "weights-float-masks": _in_folder("adapter_model.safetensors", _tensors(lambda sd: {
        k: (v.float() if not v.is_floating_point() else v) for k, v in sd.items()})),
    "weights-missing-tensor": _in_folder("adapter_model.safetensors", _tensors(lambda sd: dict(list(sd.items())[1:]))),
    "config-not-json": _in_folder("adapter_config.json", _bytes(lambda b: b[: len(b) // 2])),
    "config-list": _in_folder("adapter_config.json", _json_file(lambda c: [c])),
    "config-no-method": _in_folder("adapter_config.json", _json_file(lambda c: _set(c, "method", _DELETE))),
    "config-unknown-method": _in_folder("adapter_config.json", _json_file(lambda c: _set(c, "method", "magic"))),
    "config-unknown-key": _in_folder("adapter_config.json", _json_file(lambda c: _set(c, "colour", "red"))),
    "config-rank-string": _in_folder("adapter_config.json", _json_file(
        lambda c: _set(c, "method_config", {**c.get("method_config", {}), "rank": "eight"}))),
    "config-classes-number": _in_folder("adapter_config.json", _json_file(lambda c: _set(c, "classes", 4))),
    "config-format-version-string": _in_folder("adapter_config.json", _json_file(
        lambda c: _set(c, "format_version", "2"))),
    "no-weights": _drop("adapter_model.safetensors"),
    "no-config": _drop("adapter_config.json"),
    "a-file": _file_instead,
    "missing": _missing,
}

REPORT_DAMAGE = {
    "not-json": _bytes(lambda b: b[: len(b) // 2]),
    "empty": _bytes(lambda b: b""),
    "binary": _bytes(lambda b: bytes(range(256))),
    "list": _json_file(lambda r: [r]),
    "empty-object": _json_file(lambda r: {}),
    "wrong-types": _json_file(lambda r: {k: "x" for k in r}),
    "numbers-as-strings": _json_file(lambda r: {**r, "before": {k: str(v) for k, v in r["before"].items()}}),
    "folder-without-report": _not_a_file,
    "missing": _missing,
}

CONFIG_DAMAGE = {
    "malformed": lambda src, dst: dst.write_text("^\n"),
    "binary": lambda src, dst: dst.write_bytes(bytes(range(256))),
    "a-folder": _not_a_file,
    "missing": _missing,
    "a-list": lambda src, dst: dst.write_text("- epochs\n- 3\n"),
    "value-wrong-type": lambda src, dst: dst.write_text("epochs: abc\nbatch_size: [1, 2]\n"),
    "switch-not-bool": lambda src, dst: dst.write_text("quiet: maybe\n"),
    "bad-choice": lambda src, dst: dst.write_text("schedule: sometimes\ncriterion: vibes\n"),
}


# ----------------------------------------------------------------------------- valid inputs (once)
@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """One valid file of every kind: model, graph, metanetwork, bundle, report."""
    from metaprune.graph import to_graph

    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    m = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2.0)
    model = save_model(m, root / "model.safetensors")
    graph = to_graph(m).save(root / "graph.safetensors")
    metanet = root / "metanet"
    shutil.copytree(DEFAULT_METANET, metanet, ignore=shutil.ignore_patterns("*.md", "*.jsonl"))
    bundle = root / "bundle"
    rc = main(["adapt", str(model), "--task", "synthetic", "--steps", "1", "--warmup-epochs", "0",
               "--recovery-epochs", "1", "--max-steps-per-epoch", "1", "--min-steps", "0", "--device", "cpu",
               "-o", str(bundle), "-q"])
    assert rc == 0 and (bundle / "adapter_config.json").exists()
    assert main(["prune", str(model), "--ratio", "0.3", "--no-latency", "--device", "cpu", "-o",
                 str(root / "pruned"), "-q"]) == 0
    return {"model": model, "graph": graph, "metanet": metanet, "bundle": bundle,
            "report": root / "pruned" / "report.json", "config": None}


# verbs that read each kind of file; {f}: the damaged file, {m}/{mn}/{b}: valid inputs, {o}: the output
MODEL_VERBS = {
    "eval": "eval {f} --data synthetic --no-latency",
    "finetune": "finetune {f} --data synthetic --epochs 1 --max-steps-per-epoch 1 -o {o}",
    "prune": "prune {f} --ratio 0.5 --no-latency -o {o}",
    "curve": "curve {f} --data synthetic --steps 1 -o {o}",
    "convert": "convert {f} -o {o}/g.safetensors",
    "transform": "transform {f} --metanet {mn} --data synthetic --calib-batches 0 -o {o}/e.safetensors",
    "adapt": "adapt {f} --task synthetic --steps 1 --max-steps-per-epoch 1 -o {o}",
    "merge-source": "merge {b} --source {f} -o {o}/merged.safetensors",
    "demo": "demo {f} --metanet {mn} --data synthetic --fast -o {o}",
    "export": "export {f} -o {o}/m.onnx",
}
VERBS = {
    "model": MODEL_VERBS,
    "graph": {"convert-to-model": "convert {f} --to-model -o {o}/m.safetensors"},
    "metanet": {"transform-metanet": "transform {m} --metanet {f} --data synthetic --calib-batches 0 -o {o}/e.safetensors",
                "demo-metanet": "demo {m} --metanet {f} --data synthetic --fast -o {o}"},
    "bundle": {"merge": "merge {f} --source {m} -o {o}/merged.safetensors",
               "export-bundle": "export {f} --source {m} -o {o}/m.onnx"},
    "report": {"report": "report {f}"},
    "config": {
        "train": "train --config {f} --model cifar_resnet20 --data synthetic -o {o}",
        "eval": "eval {m} --config {f} --data synthetic --no-latency",
        "finetune": "finetune {m} --config {f} --data synthetic -o {o}",
        "prune": "prune {m} --config {f} --ratio 0.5 -o {o}",
        "curve": "curve {m} --config {f} --data synthetic -o {o}",
        "convert": "convert {m} --config {f} -o {o}/g.safetensors",
        "zoo": "zoo --config {f} --data synthetic --count 1 -o {o}",
        "meta-train": "meta-train --config {f} --zoo {o}/zoo -o {o}",
        "transform": "transform {m} --config {f} --metanet {mn} -o {o}/e.safetensors",
        "adapt": "adapt {m} --config {f} --task synthetic -o {o}",
        "merge": "merge {b} --config {f} --source {m} -o {o}/merged.safetensors",
        "demo": "demo {m} --config {f} --metanet {mn} --fast -o {o}",
        "export": "export {m} --config {f} -o {o}/m.onnx",
    },
}
DAMAGE = {"model": {**MODEL_DAMAGE, **PT_DAMAGE}, "graph": GRAPH_DAMAGE, "metanet": METANET_DAMAGE,
          "bundle": BUNDLE_DAMAGE, "report": REPORT_DAMAGE, "config": CONFIG_DAMAGE}
CASES = [(kind, verb, dmg) for kind, verbs in VERBS.items() for verb in verbs for dmg in DAMAGE[kind]]


def _snapshot(p: Path) -> dict:
    if p.is_dir():
        return {str(q.relative_to(p)): file_sha256(q) for q in sorted(p.rglob("*")) if q.is_file()}
    return {"": file_sha256(p)} if p.is_file() else {}


@pytest.mark.parametrize("kind,verb,damage", CASES, ids=[f"{k}-{v}-{d}" for k, v, d in CASES])
def test_damaged_file(valid, tmp_path, capsys, kind, verb, damage):
    src = valid[kind]
    suffix = ".pt" if damage.startswith("pt-") else {"model": ".safetensors", "graph": ".safetensors",
                                                     "report": ".json", "config": ".yaml"}.get(kind, "")
    f = tmp_path / f"damaged{suffix}"
    DAMAGE[kind][damage](src, f)
    before = _snapshot(f)
    out = tmp_path / "out"
    argv = VERBS[kind][verb].format(f=f, m=valid["model"], mn=valid["metanet"], b=valid["bundle"], o=out).split()
    try:
        rc = main([*argv, "-q"] if kind != "report" else argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in cap.err and "Traceback" not in cap.out, cap.err
    assert rc == 2, f"exit {rc}; stderr: {cap.err[-800:]}"
    assert len(errors) == 1, cap.err
    assert not out.exists() or not any(out.rglob("*")), f"wrote {sorted(out.rglob('*'))[:5]}"
    assert _snapshot(f) == before


def test_table_size():
    """The table is what the report quotes (update both together)."""
    by_kind = {k: sum(1 for c in CASES if c[0] == k) for k in VERBS}
    assert len(CASES) == sum(by_kind.values()) >= 400, by_kind
