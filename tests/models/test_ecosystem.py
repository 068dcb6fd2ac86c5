"""Ecosystem architectures (torchvision:NAME, timm:NAME, trusted pkg.module:factory): prune -> save ->
load gives the same outputs, for every torchvision classification builder (heavy ones are slow), and
the CLI's bad inputs each give one clear error (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

from metaprune.cli import main
from metaprune.errors import ConfigError, MetapruneError, ModelFileError, UnknownNameError
from metaprune.io import load_model, save_model
from metaprune.models import create_model, get_widths, model_facts, trusted_code
from metaprune.pruning import PruneConfig, prune

# default suite: cheap builders covering each family's layer kinds (depthwise/grouped convs, SE gates,
# LayerNorm2d + layer scale, MNASNet's versioned state dict, RegNet, fire modules)
FAST = ["mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "regnet_x_400mf", "efficientnet_b0",
        "squeezenet1_1", "resnet18", "convnext_tiny", "googlenet", "shufflenet_v2_x0_5",  # ShuffleNet: refused
        "vit_b_16"]  # nn.MultiheadAttention: head size pruned, heads kept (~5 s at 32 px)


def _params():
    out = []
    for n in torchvision.models.list_models(module=torchvision.models):
        marks = [] if n in FAST else [pytest.mark.slow]
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def _size(name: str) -> int:
    size = max(32, model_facts(f"torchvision:{name}").min_input_size)
    patch = int(name.rsplit("_", 1)[1]) if name.startswith("vit_") else 1  # ViTs: a whole number of patches
    return -(-size // patch) * patch


@pytest.mark.parametrize("name", _params())
def test_prune_save_load_same_outputs(name, tmp_path):
    torch.manual_seed(0)
    size = _size(name)
    model = create_model(f"torchvision:{name}", num_classes=10, image_size=size).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruned = prune(model, PruneConfig(ratio=0.3)).model.eval()
        except MetapruneError as e:  # torch-pruning cannot prune it: a clear refusal is fine
            assert str(e)
            return
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_model(pruned, tmp_path)
    loaded, info = load_model(tmp_path)
    assert info.arch == f"torchvision:{name}" and info.arch_args["image_size"] == size
    assert get_widths(loaded) == get_widths(pruned)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = pruned(x), loaded(x)
    # deep nets (ResNet-152, Inception-v3) differ by ~1e-6 relative: float32 sums in another order (the
    # pruned model's weights are strided slices, the reloaded ones contiguous)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_save_model_names_a_module_built_outside_create_model(tmp_path):
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    pruned = prune(m, PruneConfig(ratio=0.5), input_shape=(3, 64, 64)).model.eval()
    with pytest.raises(ConfigError, match="was not built by metaprune.create_model"):
        save_model(pruned, tmp_path / "a")
    with pytest.raises(ConfigError, match="not a 'torchvision:resnet18'"):
        save_model(pruned, tmp_path / "a", arch="torchvision:resnet18", arch_args={"num_classes": 10})
    save_model(pruned, tmp_path / "a", arch="torchvision:mobilenet_v2", arch_args={"num_classes": 10, "image_size": 64})
    loaded, info = load_model(tmp_path / "a")
    assert info.arch_args == {"num_classes": 10, "in_chans": 3, "image_size": 64}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), loaded(x), rtol=1e-5, atol=1e-6)


def test_pruned_bare_state_dict_loads_with_arch(tmp_path):
    """A pruned torchvision model saved with torch.save (no metadata): widths come from the tensor
    shapes, depthwise convolutions included (their groups shrink with their channels)."""
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    pruned = prune(m, PruneConfig(ratio=0.4), input_shape=(3, 32, 32)).model.eval()
    torch.save(pruned.state_dict(), tmp_path / "p.pt")
    loaded, info = load_model(tmp_path / "p.pt", arch="torchvision:mobilenet_v2", arch_args={"image_size": 32})
    assert info.arch_args == {"num_classes": 10, "in_chans": 3, "image_size": 32}
    assert loaded.features[1].conv[0][0].groups == pruned.features[1].conv[0][0].groups < 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), loaded(x), rtol=1e-5, atol=1e-6)


class _Mha(nn.Module):
    """Patch embedding + nn.MultiheadAttention + LayerNorm (no reshape by a stored width)."""

    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, 32, 4, 4)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x).mean(1))


def mha_factory(num_classes=10, in_chans=3):
    return _Mha(num_classes, in_chans)


def test_multihead_attention_widths_round_trip(tmp_path):
    """nn.MultiheadAttention pruned by torch-pruning's DepGraph (embed width and head size): embed_dim, kdim, vdim,
    head_dim and the LayerNorm reload at the pruned widths and give the same outputs."""
    import torch_pruning as tp

    torch.manual_seed(0)
    with trusted_code():
        m = create_model(f"{__name__}:mha_factory", num_classes=5, image_size=16).eval()
        ex = torch.randn(2, 3, 16, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(m, ex[:1])
            # the residual width: 2 of the 8 channels of each of the 4 heads
            dg.get_pruning_group(m.embed, tp.prune_conv_out_channels,
                                 idxs=[h * 8 + k for h in range(4) for k in (6, 7)]).prune()
        att = m.attn
        assert (att.embed_dim, att.head_dim, m.norm.normalized_shape) == (24, 6, (24,))
        save_model(m, tmp_path)
        loaded, _ = load_model(tmp_path)
    a2 = loaded.attn
    assert (a2.embed_dim, a2.kdim, a2.vdim, a2.num_heads, a2.head_dim) == (24, 24, 24, 4, 6)
    with torch.no_grad():
        assert torch.allclose(m(ex), loaded(ex), rtol=1e-5, atol=1e-6)


class _Gn(nn.Module):
    """GroupNorm + layer scale + depthwise conv, for the trusted user-factory path."""

    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.gn(self.stem(x))
        x = x + self.gamma * self.dw(x)
        return self.head(x.mean((2, 3)))


def user_factory(num_classes=10, in_chans=3):
    return _Gn(num_classes, in_chans)


def test_user_factory_needs_trust_and_groupnorm_layer_scale_reload(tmp_path):
    arch = f"{__name__}:user_factory"
    with pytest.raises(ConfigError, match="--trust-code"):
        create_model(arch)
    with trusted_code():
        m = create_model(arch, num_classes=5, image_size=16).eval()
        import torch_pruning as tp

        pruned = m  # by DepGraph: the engine hands (C,1,1) layer scales over on the wrong dim (issue 13 item 5)
        dg = tp.DependencyGraph().build_dependency(m, torch.randn(1, 3, 16, 16), unwrapped_parameters=[(m.gamma, 0)])
        dg.get_pruning_group(m.stem, tp.prune_conv_out_channels, idxs=list(range(1, 16, 2))).prune()
        assert pruned.gn.num_channels == 8 and pruned.gamma.shape[0] == 8 and pruned.dw.groups == 8
        save_model(pruned, tmp_path)
        loaded, _ = load_model(tmp_path)
    with pytest.raises(ModelFileError, match="--trust-code"):  # the file names user code: trust needed again
        load_model(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(pruned(x), loaded(x), rtol=1e-5, atol=1e-6)


def test_unknown_names_list_close_ones():
    with pytest.raises(UnknownNameError, match="torchvision:mobilenet_v2"):
        create_model("torchvision:mobilenet_v9")


def test_timm_resnet_round_trip(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = create_model("timm:resnet18", num_classes=10, image_size=32).eval()
    pruned = prune(m, PruneConfig(ratio=0.3)).model.eval()
    save_model(pruned, tmp_path)
    loaded, info = load_model(tmp_path)
    assert info.arch == "timm:resnet18"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), loaded(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def mnv2_pt(tmp_path_factory):
    p = tmp_path_factory.mktemp("eco") / "mnv2.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), p)
    return p


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_prune_state_dict_then_fresh_process_reload(mnv2_pt, tmp_path, capsys):
    rc, err = _cli(capsys, "prune", mnv2_pt, "--arch", "torchvision:mobilenet_v2", "--num-classes", "10",
                   "--input-size", "32", "--ratio", "0.5", "--no-latency", "-q", "-o", tmp_path / "out")
    assert rc == 0, err
    code = (f"import torch; from metaprune.io import load_model; m, i = load_model({str(tmp_path / 'out')!r}); "
            "print(i.arch, i.arch_args['image_size'], m(torch.zeros(1, 3, 32, 32)).shape[1], "
            "m.features[0][0].out_channels)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["torchvision:mobilenet_v2", "32", "10", "16"]


@pytest.mark.slow  # builds every torchvision builder on the meta device once (~10-30 s on 2 busy cores)
def test_cli_bare_state_dict_matched_by_keys(mnv2_pt, tmp_path, capsys):
    rc, err = _cli(capsys, "prune", mnv2_pt, "--ratio", "0.3", "--no-latency", "-q", "-o", tmp_path / "o")
    assert rc == 0, err
    _, info = load_model(tmp_path / "o")
    assert info.arch == "torchvision:mobilenet_v2" and info.arch_args["num_classes"] == 10


@pytest.mark.slow  # as above
def test_cli_unmatched_state_dict_says_pass_arch(tmp_path, capsys):
    p = tmp_path / "odd.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)).state_dict(), p)
    rc, err = _cli(capsys, "eval", p, "--data", "synthetic")
    assert rc == 2 and "pass --arch" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,expect", [
    (["--arch", "torchvision:mobilenet_v9"], "close names: torchvision:mobilenet_v2"),
    (["--arch", "torchvision:resnet18"], "does not fit architecture 'torchvision:resnet18'"),
    (["--arch", "torchvision:mobilenet_v2", "--num-classes", "7"], "has 10 outputs, not --num-classes 7"),
    (["--arch", "os.path:join"], "needs --trust-code"),
    (["--num-classes", "10"], "give --arch too"),
])
def test_cli_bad_arch_inputs_one_error_each(mnv2_pt, tmp_path, capsys, argv, expect):
    rc, err = _cli(capsys, "prune", mnv2_pt, *argv, "--ratio", "0.3", "--no-latency", "-q", "-o", tmp_path / "o")
    assert rc == 2 and expect in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_missing_timm_names_the_extra(mnv2_pt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    rc, err = _cli(capsys, "prune", mnv2_pt, "--arch", "timm:resnet18", "--ratio", "0.3", "-o", tmp_path / "o")
    assert rc == 2 and "metaprune[timm]" in err and err.count("\n") == 1, err


def test_trust_code_is_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "--trust-code" in capsys.readouterr().out
