"""Damaged or edited bundles: every one is refused with one BundleError line (never a TypeError, never a silent merge).

Each case edits a valid bundle the way a fuzzer or a careless user would and runs ``metaprune merge`` on it:
exit code 2, one ``error:`` line, no traceback, nothing written, the bundle itself unchanged.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from metaprune.cli import main
from metaprune.errors import BundleError
from metaprune.io import load_model
from spa import merge

CFG, W = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good_bundle(source_path, tmp_path_factory):
    from test_bundle import _pruned_adapted, _save

    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "hydra")
    return _save(m, "hydra", src, tmp_path_factory.mktemp("good") / "b")


def _cfg(**edit):
    return lambda c, t, sp: c.update(edit)


def _mc(**edit):
    return lambda c, t, sp: c["method_config"].update(edit)


def _drop(key):
    return lambda c, t, sp: c.pop(key)


def _set_tensor(name, fn):
    def f(c, t, sp):
        t[name] = fn(t[name].clone())
    return f


def _nan(v):
    v[3] = float("nan")
    return v


def _inf(v):
    v[-1] = float("inf")
    return v


def _short_values(c, t, sp):
    t["values"] = t["values"][:-5].clone()
    c["n_values"] -= 5


def _pad_bit(m):
    m[-1] |= 0x80  # a bit past the last mask slot (resnet20's slot count is not a multiple of 8)
    return m


def _decoupled_mask(c, t, sp):
    """In bn1's mask only, swap one kept and one pruned channel (same count, so the values still fit)."""
    from spa import adapt_model
    from spa.bundle import _mask_slots, _pack_bits, _unpack_bits
    from spa.methods import get_method

    src, _ = load_model(sp)
    slots = _mask_slots(adapt_model(src, "hydra", get_method("hydra")[0](rank=3), num_classes=4))
    bits = _unpack_bits(t["masks"], sum(s for _, _, s in slots)).clone()
    pos = 0
    for name, _dim, size in slots:
        if name == "bn1":
            break
        pos += size
    seg = bits[pos:pos + 16]
    kept, pruned = int(seg.nonzero()[0]), int((~seg).nonzero()[0])
    bits[pos + kept], bits[pos + pruned] = False, True
    t["masks"] = _pack_bits(bits)


CASES = {
    "config is a list": "list",
    "unknown key": _cfg(learning_rate=0.1),
    "unknown method option": _mc(dropout=0.1),
    "rank as string": _mc(rank="3"),
    "rank 0": _mc(rank=0),
    "rank huge": _mc(rank=10**9),
    "seq_rank float": _mc(seq_rank=2.5),
    "rank disagrees": _cfg(rank=5),
    "num_classes as string": _cfg(num_classes="4"),
    "num_classes float": _cfg(num_classes=4.5),
    "num_classes vs classes": _cfg(num_classes=3),
    "format_version string": _cfg(format_version="2"),
    "format_version bool": _cfg(format_version=True),
    "format_version 0": _cfg(format_version=0),
    "layout of another format": _cfg(layout="packed-v1"),
    "method unknown": _cfg(method="adapterX"),
    "method_config a list": _cfg(method_config=[3]),
    "classes a string": _cfg(classes="abcd"),
    "input_shape short": _cfg(input_shape=[1, 28]),
    "input_shape huge": _cfg(input_shape=[1, 10**6, 28]),
    "input_shape channels": _cfg(input_shape=[3, 28, 28]),
    "sha not hex": _cfg(source_sha256="z" * 64),
    "head a number": _cfg(head=7),
    "value_dtype unknown": _cfg(value_dtype="int8"),
    "norm_stats unknown": _cfg(norm_stats="raw"),
    "extra a string": _cfg(extra="x"),
    "missing head": _drop("head"),
    "missing n_values": _drop("n_values"),
    "NaN value": _set_tensor("values", _nan),
    "Inf value": _set_tensor("values", _inf),
    "float masks": _set_tensor("masks", lambda m: m.float()),  # same numbers; was cast back silently
    "float64 values": _set_tensor("values", lambda v: v.double()),
    "2-D values": _set_tensor("values", lambda v: v.view(1, -1)),
    "extra tensor": lambda c, t, sp: t.update(bias=torch.zeros(3)),
    "values shorter, n_values too": _short_values,
    "n_values off by one": lambda c, t, sp: c.update(n_values=c["n_values"] + 1),
    "mask padding bit": _set_tensor("masks", _pad_bit),
    "mask decoupled from its group": _decoupled_mask,
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_bundle_is_refused(good_bundle, source_path, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    shutil.copytree(good_bundle, bad)
    cfg = json.loads((bad / CFG).read_text())
    tensors = load_file(str(bad / W))
    if CASES[case] == "list":
        cfg = [cfg]
    else:
        CASES[case](cfg, tensors, source_path)
    (bad / CFG).write_text(json.dumps(cfg))
    save_file(tensors, str(bad / W))
    snapshot = {f.name: f.read_bytes() for f in bad.iterdir()}
    src, _ = load_model(source_path)
    with pytest.raises(BundleError):
        merge(bad, src)
    out = tmp_path / "merged.safetensors"
    capsys.readouterr()
    assert main(["merge", str(bad), "--source", source_path, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not out.exists() and not any(tmp_path.glob("merged*"))
    assert {f.name: f.read_bytes() for f in bad.iterdir()} == snapshot


def test_valid_bundle_still_merges(good_bundle, source_path, tmp_path):
    """The cases above start from a bundle that merges (so each failure is caused by its edit)."""
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(good_bundle), "--source", source_path, "-o", str(out), "-q"]) == 0
    assert out.exists()


def test_nan_model_is_not_saved(source_path, tmp_path):
    """A diverged adapted model is refused at save time; nothing is written."""
    from test_bundle import _pruned_adapted, _save

    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    with torch.no_grad():
        next(mod for mod in m.modules() if hasattr(mod, "lora_B")).lora_B.fill_(float("nan"))
    with pytest.raises(BundleError, match="NaN"):
        _save(m, "splora", src, tmp_path / "b")
    assert not (tmp_path / "b").exists()
