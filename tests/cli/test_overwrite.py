"""No verb may replace one of its inputs: the output is refused before any work, through folders
(files inside an input model folder, bundle, metanetwork, zoo) and symlinks too."""

import json
from pathlib import Path

import pytest

from metaprune.cli import main
from metaprune.io import file_sha256, save_model


def _tree_hashes(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            out[str(f)] = file_sha256(f)
    return out


@pytest.fixture
def world(tmp_path, tiny_resnet):
    """A model folder, a model file, a (fake) bundle, metanetwork and zoo, and a config file."""
    d = tmp_path / "d"
    save_model(tiny_resnet, d / "model.safetensors")
    m = save_model(tiny_resnet, tmp_path / "m.safetensors")
    b = tmp_path / "b"
    b.mkdir()
    (b / "adapter_config.json").write_text("{}")
    (b / "adapter_model.safetensors").write_bytes(b"bundle weights")
    mn = tmp_path / "mn"
    mn.mkdir()
    (mn / "config.json").write_text("{}")
    (mn / "metanet.safetensors").write_bytes(b"metanet weights")
    z = tmp_path / "z"
    (z / "member_000").mkdir(parents=True)
    (z / "member_000" / "model.safetensors").write_bytes(b"member")
    (tmp_path / "link_to_d").symlink_to(d)
    (tmp_path / "ld").mkdir()
    (tmp_path / "ld" / "curve.json").symlink_to(m)
    return tmp_path


# (verb arguments with {t} for the temporary folder, inputs that must stay unchanged)
CASES = {
    "prune-into-its-model-folder": ("prune {t}/d --ratio 0.5 -o {t}/d", ["d"]),
    "prune-through-a-symlinked-folder": ("prune {t}/d/model.safetensors --ratio 0.5 -o {t}/link_to_d", ["d"]),
    "prune-task-into-the-source-folder": ("prune {t}/d/model.safetensors --ratio 0.5 --task synthetic -o {t}/d",
                                          ["d"]),
    "finetune-into-its-model-folder": ("finetune {t}/d --data synthetic -o {t}/d", ["d"]),
    "train-over-its-config": ("train --config {t}/d/report.json --data synthetic -o {t}/d", ["d"]),
    "convert-graph-onto-the-model": ("convert {t}/m.safetensors -o {t}/m.safetensors", ["m.safetensors"]),
    "convert-to-model-onto-the-graph": ("convert {t}/m.safetensors --to-model -o {t}/m.safetensors",
                                        ["m.safetensors"]),
    "curve-through-a-symlinked-file": ("curve {t}/m.safetensors --data synthetic -o {t}/ld", ["m.safetensors"]),
    "transform-onto-the-metanetwork": ("transform {t}/m.safetensors --metanet {t}/mn -o {t}/mn/metanet.safetensors",
                                       ["mn", "m.safetensors"]),
    "transform-onto-the-model": ("transform {t}/m.safetensors --metanet {t}/mn -o {t}/m.safetensors",
                                 ["mn", "m.safetensors"]),
    "adapt-onto-its-source": ("adapt {t}/b/adapter_model.safetensors --task synthetic -o {t}/b", ["b"]),
    "merge-onto-the-bundle": ("merge {t}/b --source {t}/m.safetensors -o {t}/b/adapter_model.safetensors",
                              ["b", "m.safetensors"]),
    "merge-onto-the-source": ("merge {t}/b --source {t}/d -o {t}/d", ["b", "d"]),
    "zoo-into-its-config-folder": ("zoo --config {t}/d/report.json --data synthetic -o {t}/d", ["d"]),
    "meta-train-into-the-zoo": ("meta-train --zoo {t}/z -o {t}/z", ["z"]),
    "demo-into-the-source-folder": ("demo {t}/d/model.safetensors --metanet {t}/mn -o {t}/d", ["d", "mn"]),
    "export-onto-the-model": ("export {t}/m.safetensors -o {t}/m.safetensors", ["m.safetensors"]),
    "export-onto-the-bundle": ("export {t}/b --source {t}/m.safetensors -o {t}/b/adapter_model.safetensors",
                               ["b", "m.safetensors"]),
    "demo-over-edited-source": ("demo {t}/d/model.safetensors -o {t}/d", ["d"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_never_replaces_an_input(world, capsys, case):
    cmd, keep = CASES[case]
    if "--config" in cmd:  # a JSON report is valid YAML: a config file that sits where the output goes
        section = "zoo" if cmd.startswith("zoo") else "train"
        (world / "d" / "report.json").write_text(json.dumps({section: {"model": "cifar_resnet20", "epochs": 1}}))
    before = _tree_hashes(world / k for k in keep)
    listing = sorted(str(p) for p in world.rglob("*"))
    try:
        rc = main(cmd.format(t=world).split() + ["-q"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "overwrite" in lines[0] or "refusing" in lines[0], lines[0]
    assert _tree_hashes(world / k for k in keep) == before
    assert sorted(str(p) for p in world.rglob("*")) == listing  # nothing written, not even a folder


def test_every_writing_verb_is_covered():
    from metaprune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "prune" in a.choices)  # noqa: SLF001
    writing = {name for name, p in sub.choices.items()
               if any("-o" in a.option_strings or "--output" in a.option_strings for a in p._actions)}  # noqa: SLF001
    covered = {c.split()[0] for c, _ in CASES.values()}
    assert writing <= covered, f"verbs without an overwrite case: {sorted(writing - covered)}"


def test_writing_beside_an_input_is_allowed(tmp_path, tiny_resnet, capsys):
    """The guard is not over-eager: a new file next to the input, in the input's folder, is fine."""
    m = save_model(tiny_resnet, tmp_path / "m.safetensors")
    h = file_sha256(m)
    assert main(["prune", str(m), "--ratio", "0.3", "--no-latency", "-o", str(tmp_path), "-q"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "model.safetensors").exists() and file_sha256(m) == h
