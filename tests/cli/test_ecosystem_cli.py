"""Every model-file verb on models metaprune did not register (issue 13 item 3), from the command line:
a trusted user factory (``pkg.module:factory --trust-code``) as a bare state dict, pruned, finetuned,
converted to a graph and back, exported, adapted with SPA and merged; the input size a model was
trained / pruned at travels in its file; grey data for colour models with --repeat-channels."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from metaprune.cli import main
from metaprune.data.datasets import DataSplits, TensorImageDataset, repeat_channels
from metaprune.engine import count_macs
from metaprune.errors import BundleError, DataError
from metaprune.io import load_model, read_spec, save_model
from metaprune.models import create_model, trusted_code

USER_NETS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Convolutions, BatchNorm, global pooling: runs at any input of at least 3 px."""

    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny(num_classes=10, in_chans=3):
    return Tiny(num_classes, in_chans)
'''
ARCH = "eco_cli_user_nets:tiny"


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("userpkg")
    (d / "eco_cli_user_nets.py").write_text(textwrap.dedent(USER_NETS))
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("eco_cli_user_nets", None)


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def flow(user_pkg, tmp_path_factory):
    """A bare state dict of the user's model at 24 px, through prune / finetune / convert / adapt / merge
    from the command line (each step's output feeds the next)."""
    d = tmp_path_factory.mktemp("flow")
    import eco_cli_user_nets

    torch.manual_seed(0)
    torch.save(eco_cli_user_nets.tiny().state_dict(), d / "tiny.pt")
    user = ["--arch", ARCH, "--trust-code", "--input-size", "24"]
    steps = {
        "prune": ["prune", d / "tiny.pt", *user, "--ratio", "0.5", "--round-to", "1", "--no-latency", "--json",
                  "-o", d / "pruned"],
        "finetune": ["finetune", d / "pruned", "--trust-code", "--data", "synthetic", "--epochs", "1",
                     "--max-steps-per-epoch", "2", "--batch-size", "16", "--train-subset", "64", "-q",
                     "-o", d / "ft"],
        "convert": ["convert", d / "pruned", "--trust-code", "-q", "-o", d / "g.safetensors"],
        "back": ["convert", d / "g.safetensors", "--to-model", "--trust-code", "-q", "-o", d / "back"],
        "adapt": ["adapt", d / "pruned", "--trust-code", "--task", "synthetic", "--steps", "1", "--warmup-epochs",
                  "0", "--recovery-epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16",
                  "--train-subset", "64", "--rank", "2", "-q", "-o", d / "bundle"],
        "merge": ["merge", d / "bundle", "--source", d / "pruned", "--trust-code", "-q", "-o", d / "merged"],
    }
    res = {}
    for name, argv in steps.items():
        rc = main([str(a) for a in argv])
        res[name] = rc
    return d, res


def test_user_factory_every_verb(flow):
    d, rc = flow
    assert rc == dict.fromkeys(rc, 0), rc
    with trusted_code():
        src, _ = load_model(d / "tiny.pt", arch=ARCH, arch_args={"image_size": 24})
        pruned, info = load_model(d / "pruned")
        ft, _ = load_model(d / "ft")
        back, _ = load_model(d / "back")
        merged, _ = load_model(d / "merged")
    assert info.arch == ARCH and pruned.features[0].out_channels == 4
    # every file records the size the model was pruned / trained / converted / adapted at
    for name in ("pruned", "ft", "back", "merged"):
        assert read_spec(d / name / "model.safetensors")["input_size"] == 24, name
    # the report's MACs are counted at that size, before and after
    rep = json.loads((d / "pruned" / "report.json").read_text())
    assert rep["before"]["macs"] == count_macs(src, (3, 24, 24))
    assert rep["after"]["macs"] == count_macs(pruned, (3, 24, 24))
    # graph round trip: every tensor equal
    a, b = pruned.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the merged model is the bundle's task model (4 synthetic classes) at pruned widths
    x = torch.randn(2, 3, 24, 24)
    assert merged(x).shape == (2, 4) and ft(x).shape == (2, 10)


def test_export_takes_a_model_folder(flow, capsys):
    pytest.importorskip("onnxruntime")
    d, _ = flow
    rc, _, err = _cli(capsys, "export", d / "pruned", "--trust-code", "-o", d / "pruned.onnx")
    assert rc == 0, err
    rep = json.loads((d / "pruned.export.json").read_text())
    assert rep["input_shape"] == [3, 24, 24] and rep["max_abs_diff"] < 1e-4


def test_bundle_at_another_size_than_the_source_records(flow, tmp_path):
    """A convolutional source runs at any size: its recorded image_size (the default 224 for a user
    factory) does not refuse a bundle trained at 24 px; a size the source cannot take still does."""
    from spa.bundle import load_bundle, merge

    d, _ = flow
    with trusted_code():
        pruned, _ = load_model(d / "pruned")
    pruned.metaprune_arch["args"]["image_size"] = 224  # as recorded when no --input-size was given
    merged = merge(d / "bundle", pruned)
    assert merged(torch.randn(1, 3, 24, 24)).shape == (1, 4)
    bad = tmp_path / "bundle"
    bad.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (bad / f).write_bytes((d / "bundle" / f).read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["input_shape"] = [3, 2, 2]  # the stride-2 3x3 convolution needs at least 3 px
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not run at the bundle's size"):
        load_bundle(bad, pruned)


def test_shipped_checkpoint_macs_at_its_training_size(tmp_path, capsys):
    """The shipped ResNet-20 was trained on 28 px Fashion-MNIST: MACs without --data are counted at
    28 px (31.5 M), not at the registry's 32 px (41.1 M), and the pruned file records 28."""
    rc, out, err = _cli(capsys, "prune", "--ratio", "0.5", "--no-latency", "--json", "-o", tmp_path / "x")
    assert rc == 0, err
    rep = json.loads(out)
    assert round(rep["before"]["macs"] / 1e6, 1) == 31.5
    assert read_spec(tmp_path / "x" / "model.safetensors")["input_size"] == 28


def test_input_size_flag_on_model_files(tmp_path, capsys):
    """--input-size without --arch sets the size of a model file (MACs and the output's record); a
    registered arch without an image_size argument takes it for a bare state dict; a size the model
    cannot run at is one clear error."""
    torch.manual_seed(0)
    net = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    torch.save(net.state_dict(), tmp_path / "r20.pt")
    rc, out, err = _cli(capsys, "prune", tmp_path / "r20.pt", "--arch", "cifar_resnet20", "--input-size", "28",
                        "--ratio", "0.3", "--no-latency", "--json", "-o", tmp_path / "a")
    assert rc == 0, err
    assert json.loads(out)["before"]["macs"] == count_macs(net, (1, 28, 28))
    assert read_spec(tmp_path / "a" / "model.safetensors")["input_size"] == 28
    rc, out, err = _cli(capsys, "eval", tmp_path / "a", "--input-size", "20", "--data", "synthetic", "--no-latency",
                        "--json", "-q")
    assert rc == 0, err
    pruned, _ = load_model(tmp_path / "a")
    assert json.loads(out)["macs"] == count_macs(pruned, (1, 20, 20))
    vit = save_model(create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=28), tmp_path / "vit")
    rc, _, err = _cli(capsys, "eval", vit, "--input-size", "32", "--data", "synthetic", "--no-latency")
    assert rc == 2 and "does not run at --input-size 32" in err and err.count("error:") == 1, err


def _grey(n: int = 6) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
                            torch.arange(n) % 3, (0.25,), (0.5,))
    return DataSplits("grey", ds, ds, ds, 3, 1, 8)


def test_repeat_channels_values():
    data = _grey()
    rgb = repeat_channels(data, 3)
    assert rgb.in_chans == 3 and rgb.test.mean == (0.25,) * 3 and rgb.test.std == (0.5,) * 3
    x1, y1 = data.test.normalise(data.test.images), data.test.labels
    x3 = rgb.test.normalise(rgb.test.images[torch.arange(6)])
    assert x3.shape == (6, 3, 8, 8) and torch.equal(rgb.test.labels, y1)
    for c in range(3):
        assert torch.equal(x3[:, c], x1[:, 0])
    with pytest.raises(DataError, match="cannot be repeated"):
        repeat_channels(rgb, 1)


@pytest.mark.data
def test_colour_model_on_fashion_mnist_needs_repeat_channels(user_pkg, tmp_path, capsys):
    with trusted_code():
        p = save_model(create_model(ARCH, num_classes=10, in_chans=3), tmp_path / "rgb.safetensors")
    rc, _, err = _cli(capsys, "eval", p, "--trust-code", "--data", "fashion-mnist", "--no-latency")
    assert rc == 2 and "--repeat-channels" in err
    rc, out, err = _cli(capsys, "eval", p, "--trust-code", "--data", "fashion-mnist", "--repeat-channels",
                        "--no-latency", "--json")
    assert rc == 0, err
    assert "repeated to the model's 3 input channels" in err and json.loads(out)["data"] == "fashion-mnist"


def test_in_chans_that_contradicts_the_weights(flow, capsys):
    """--in-chans 1 for a colour state dict: one error naming the first convolution (it used to say the
    layer shapes were corrupt)."""
    d, _ = flow
    rc, _, err = _cli(capsys, "eval", d / "tiny.pt", "--arch", ARCH, "--trust-code", "--in-chans", "1",
                      "--data", "synthetic", "--no-latency")
    assert rc == 2 and err.count("error:") == 1, err
    assert "first convolution features.0 takes 3 input channels, not --in-chans 1" in err


@pytest.mark.parametrize("verb", ["prune", "eval", "convert"])
def test_arch_without_a_model_file_is_refused(verb, tmp_path, capsys):
    """--arch with no model file used to prune / evaluate the shipped cifar_resnet20 silently."""
    extra = {"prune": ["--ratio", "0.5", "-o", str(tmp_path / "out")], "eval": [],
             "convert": ["-o", str(tmp_path / "out")]}[verb]
    rc = main([verb, "--arch", "torchvision:vit_b_16", *extra, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no model file was given" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
