import os

import pytest
import torch

from metaprune import create_model
from metaprune.errors import ModelFileError, OutputError
from metaprune.io import file_sha256, load_model, save_model, state_dict_sha256


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip(tmp_path, tiny_resnet):
    p = save_model(tiny_resnet, tmp_path / "m", extra={"note": "x"})
    assert p.name == "model.safetensors"
    m, info = load_model(tmp_path / "m")
    assert info.arch == "cifar_resnet20" and info.extra == {"note": "x"}
    assert _same(m, tiny_resnet)
    assert not list(tmp_path.glob("m/.*tmp"))


def test_pruned_widths_reload_without_pickle(tmp_path):
    import torch_pruning as tp

    m = create_model("cifar_vgg11_bn", num_classes=4, in_chans=1).eval()
    x = torch.randn(1, 1, 28, 28)
    dg = tp.DependencyGraph().build_dependency(m, x)
    dg.get_pruning_group(m.features[0], tp.prune_conv_out_channels, idxs=[0, 3, 5]).prune()
    p = save_model(m, tmp_path / "v.safetensors")
    m2, _ = load_model(p)
    assert m2.features[0].out_channels == 61
    assert torch.equal(m(x), m2(x))


def test_bare_state_dict_pt_is_matched_by_keys_and_shapes(tmp_path):
    m = create_model("cifar_resnet32", num_classes=5, in_chans=1).eval()
    torch.save(m.state_dict(), tmp_path / "resnet32.pt")
    m2, info = load_model(tmp_path / "resnet32.pt")
    assert info.arch == "cifar_resnet32" and info.arch_args == {"num_classes": 5, "in_chans": 1}
    assert _same(m, m2)


def test_checkpoint_dict_and_module_prefix(tmp_path):
    m = create_model("cifar_resnet20").eval()
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}, "epoch": 3}, tmp_path / "c.pt")
    m2, info = load_model(tmp_path / "c.pt")
    assert info.arch == "cifar_resnet20" and _same(m, m2)


def test_unmatched_state_dict_lists_candidates(tmp_path):
    sd = create_model("cifar_resnet20").state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(ModelFileError, match="closest: cifar_resnet20"):
        load_model(tmp_path / "x.pt")


def test_pickled_module_needs_trust(tmp_path, tiny_resnet):
    torch.save(tiny_resnet, tmp_path / "whole.pt")
    with pytest.raises(ModelFileError, match="--trust-pickle"):
        load_model(tmp_path / "whole.pt")
    m, _ = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert _same(m, tiny_resnet)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files_give_clear_errors(tmp_path, tiny_resnet, suffix):
    p = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(tiny_resnet.state_dict(), p)
    else:
        save_model(tiny_resnet, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(p)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_input_is_never_overwritten(tmp_path, tiny_resnet):
    p = save_model(tiny_resnet, tmp_path / "a.safetensors")
    h = file_sha256(p)
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(create_model("cifar_resnet20", in_chans=1), p, inputs=(p,))
    assert file_sha256(p) == h


def test_unwritable_output(tmp_path, tiny_resnet, monkeypatch):
    """A write that fails (here: the final rename is refused, as on a read-only folder; works as
    root too) is one OutputError, and neither the file nor its temporary is left."""
    import errno

    def refuse(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="Permission denied"):
        save_model(tiny_resnet, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder(tmp_path, tiny_resnet):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(OutputError):
        save_model(tiny_resnet, d / "m.safetensors")


def test_output_through_a_symlink_onto_an_input_is_refused(tmp_path, tiny_resnet):
    p = save_model(tiny_resnet, tmp_path / "d" / "model.safetensors")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    h = file_sha256(p)
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(create_model("cifar_resnet20", in_chans=1), tmp_path / "link", inputs=(tmp_path / "d",))
    assert file_sha256(p) == h


def test_load_builds_on_the_meta_device(tmp_path, tiny_resnet, monkeypatch):
    """Loading does not spend time on a random initialisation that the weights then overwrite."""
    p = save_model(tiny_resnet, tmp_path / "m.safetensors")
    touched = []
    for name in ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_"):
        real = getattr(torch.nn.init, name)

        def spy(*a, _real=real, **k):
            t = a[0] if a else k["tensor"]
            if not t.is_meta:
                touched.append(tuple(t.shape))
            return _real(*a, **k)

        monkeypatch.setattr(torch.nn.init, name, spy)
    m, _ = load_model(p)
    assert touched == []
    assert _same(m, tiny_resnet) and not any(t.is_meta for t in m.state_dict().values())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(m(x), tiny_resnet(x))


def _respec(path, out, edit=None, tensors=None):
    """Copy a model file with its metadata edited by ``edit(spec)`` and/or tensors replaced."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from metaprune.io import META_KEY

    with safe_open(str(path), "pt") as f:
        spec = json.loads(f.metadata()[META_KEY])
    if edit:
        edit(spec)
    sd = {**load_file(str(path)), **(tensors or {})}
    save_file(sd, str(out), metadata={META_KEY: json.dumps(spec), "format": "pt"})
    return out


@pytest.mark.parametrize("layer,attr,value", [
    ("conv1", "padding_mode", "reflect"), ("conv1", "dilation", [2, 2]), ("conv1", "padding", [0, 0]),
    ("conv1", "stride", [2, 2]), ("bn1", "eps", 1.0), ("bn1", "momentum", 0.5), ("bn1", "training", True),
    ("fc", "weight", 3), ("layer1.0.bn1", "num_features", -16), ("layer1.0.bn1", "num_features", 16.0),
    ("layer1.0.bn1", "num_features", True), ("conv1", "groups", 0), ("conv1", "out_channels", "16"),
])
def test_metadata_cannot_change_behaviour(tmp_path, tiny_resnet, layer, attr, value):
    """Only structural widths with positive integer values are taken from a file (these edits used
    to load silently and change the logits)."""
    p = save_model(tiny_resnet, tmp_path / "m.safetensors")
    bad = _respec(p, tmp_path / "bad.safetensors", lambda s: s["widths"][layer].update({attr: value}))
    with pytest.raises(ModelFileError, match=rf"{attr}|positive integer"):
        load_model(bad)


@pytest.mark.parametrize("what", ["widths-disagree", "layers-do-not-connect", "nan", "inf", "widths-not-object"])
def test_widths_and_tensors_are_checked_against_the_architecture(tmp_path, tiny_resnet, what):
    p = save_model(tiny_resnet, tmp_path / "m.safetensors")
    w = tiny_resnet.conv1.weight.detach().clone()
    w[0, 0, 0, 0] = float("nan") if what == "nan" else float("inf")
    edit = {"widths-disagree": (lambda s: s["widths"]["conv1"].update(out_channels=8), None),
            "widths-not-object": (lambda s: s.update(widths=[16]), None),
            "layers-do-not-connect": (None, {"layer1.0.conv2.weight": torch.zeros(16, 8, 3, 3)}),
            "nan": (None, {"conv1.weight": w}), "inf": (None, {"conv1.weight": w})}[what]
    bad = _respec(p, tmp_path / "bad.safetensors", *edit)
    with pytest.raises(ModelFileError, match="shape|connect|NaN|object"):
        load_model(bad)


def test_pruned_vit_round_trips(tmp_path):
    """Validation accepts what the pruning engine produces (heads and MLP channels removed)."""
    from metaprune.pruning import PruneConfig, prune

    m = create_model("vit_tiny_p4", num_classes=4, in_chans=1, image_size=28).eval()
    res = prune(m, PruneConfig(ratio=0.34), input_shape=(1, 28, 28))
    p = save_model(res.model, tmp_path / "v.safetensors")
    m2, _ = load_model(p)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(m2(x), res.model.eval()(x))


def test_output_under_a_file_is_refused(tmp_path, tiny_resnet):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="cannot create"):
        save_model(tiny_resnet, tmp_path / "f" / "m.safetensors")


def test_weights_hash_is_format_independent(tmp_path, tiny_resnet):
    save_model(tiny_resnet, tmp_path / "a.safetensors")
    torch.save(tiny_resnet.state_dict(), tmp_path / "a.pt")
    a, _ = load_model(tmp_path / "a.safetensors")
    b, _ = load_model(tmp_path / "a.pt")
    assert state_dict_sha256(a) == state_dict_sha256(b) == state_dict_sha256(tiny_resnet)


def test_outputs_get_umask_permissions(tmp_path, tiny_resnet):
    """Files come out with the usual permissions (not the 0600 of a temporary file)."""
    old = os.umask(0o022)
    try:
        save_model(tiny_resnet, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- input size (issue 13 follow-up)
def test_input_size_is_recorded_and_reloaded(tmp_path, tiny_resnet):
    from metaprune.engine.report import input_shape
    from metaprune.io import read_spec

    p = save_model(tiny_resnet, tmp_path / "m.safetensors", input_size=28)
    assert read_spec(p)["input_size"] == 28
    m, _ = load_model(p)
    assert input_shape(m) == (1, 28, 28)
    q = save_model(m, tmp_path / "again.safetensors")  # a loaded model keeps its size when saved again
    assert read_spec(q)["input_size"] == 28
    m20, _ = load_model(p, input_size=20)  # the caller's size wins (the CLI's --input-size)
    assert input_shape(m20) == (1, 20, 20)


@pytest.mark.parametrize("value", ["28", True, 0, -3, 2.5, 1 << 17, None, [28]])
def test_input_size_metadata_is_validated(tmp_path, tiny_resnet, value):
    p = save_model(tiny_resnet, tmp_path / "m.safetensors")
    bad = _respec(p, tmp_path / "bad.safetensors", lambda s: s.update(input_size=value))
    with pytest.raises(ModelFileError, match="input_size"):
        load_model(bad)


def test_files_without_input_size_still_load(tmp_path, tiny_resnet):
    """Files written before the field existed: the size of the built-in dataset they name in
    ``extra.data``, else the architecture's default (32 px for the CIFAR ResNets)."""
    from metaprune.engine.report import input_shape

    p = save_model(tiny_resnet, tmp_path / "m.safetensors", extra={"data": "fashion-mnist"})
    old = _respec(p, tmp_path / "old.safetensors", lambda s: s.pop("input_size", None))
    m, _ = load_model(old)
    assert input_shape(m) == (1, 28, 28) and _same(m, tiny_resnet)
    plain = _respec(p, tmp_path / "plain.safetensors", lambda s: (s.pop("input_size", None), s.update(extra={})))
    m, _ = load_model(plain)
    assert input_shape(m) == (1, 32, 32)


# ----------------------------------------------------------------------------- header first, tensors after
@pytest.mark.parametrize("what", ["widths", "tensor-name", "tensor-shape", "arch", "input_size"])
def test_model_metadata_is_validated_before_tensors_are_read(tmp_path, tiny_resnet, monkeypatch, what):
    """A file whose metadata or tensor names / shapes do not fit is refused from its header alone:
    no tensor data is materialised."""
    import metaprune.io as mio

    p = save_model(tiny_resnet, tmp_path / "m.safetensors")
    edit, tensors = {
        "widths": (lambda s: s["widths"]["conv1"].update(out_channels=8), None),
        "tensor-name": (None, {"extra.weight": torch.zeros(3)}),
        "tensor-shape": (None, {"fc.weight": torch.zeros(10, 63)}),
        "arch": (lambda s: s.update(arch="no_such_model"), None),
        "input_size": (lambda s: s.update(input_size=0), None),
    }[what]
    bad = _respec(p, tmp_path / "bad.safetensors", edit, tensors)
    reads = []

    def spy(*a, **k):
        reads.append(a)
        raise AssertionError("tensor data read before the metadata was validated")

    monkeypatch.setattr(mio, "load_state_dict_file", spy)
    monkeypatch.setattr(mio, "load_file", spy)
    with pytest.raises(ModelFileError):
        load_model(bad)
    assert reads == []


def test_graph_header_is_validated_before_tensors_are_read(tmp_path, tiny_resnet, monkeypatch):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import metaprune.graph.graph as gg
    from metaprune.graph import Graph, GraphFileError, to_graph

    p = to_graph(tiny_resnet).save(tmp_path / "g.safetensors")
    with safe_open(str(p), "pt") as f:
        meta = dict(f.metadata())
    head = json.loads(meta[gg.GRAPH_META_KEY])
    head["spec"]["layout"][0]["count"] = 10 ** 9  # a layout range past the node tensor
    tensors = load_file(str(p))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, gg.GRAPH_META_KEY: json.dumps(head)})
    calls = []
    real = gg.load_file
    monkeypatch.setattr(gg, "load_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(GraphFileError):
        Graph.load(tmp_path / "bad.safetensors")
    assert calls == []
    g = Graph.load(p)  # a good file: read once, after its header was checked
    assert len(calls) == 1 and torch.equal(g.x, to_graph(tiny_resnet).x)
