"""``round_to="auto"`` (the default of ``prune``): hardware-friendly widths from a device/dtype table,
per-layer multiples, the MAC target still met, ``round_to=1`` exact, and the report says what was used."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from metaprune.cli import main
from metaprune.io import save_model
from metaprune.models import create_model
from metaprune.pruning import PruneConfig, prune, rounding
from metaprune.pruning.report import compare

SHAPE = (1, 16, 16)


def _convs(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()


@pytest.fixture
def cap(monkeypatch):
    """Pretend to run on a CPU with the given vector ISA."""
    def set_cap(name: str):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: name)
    return set_cap


@pytest.mark.parametrize("device,dtype,isa,want", [
    ("cpu", torch.float32, "AVX512", 8), ("cpu", torch.float32, "AVX2", 8), ("cpu", torch.float32, "DEFAULT", 4),
    ("cpu", torch.float32, "SVE256", 4), ("cpu", torch.bfloat16, "AVX512", 16), ("cuda", torch.float16, "-", 8),
    ("cuda", torch.bfloat16, "-", 8), ("cuda", torch.float32, "-", 4), ("mps", torch.float32, "-", 8)])
def test_auto_picks_the_table_multiple(cap, device, dtype, isa, want):
    cap(isa)
    m, info = rounding.table_multiple(device, dtype)
    assert m == want and info["multiple"] == want and info["reason"]
    assert info["device"] == device and info["dtype"] == str(dtype).removeprefix("torch.")


def test_auto_resolves_from_the_models_device_and_dtype(cap, resnet20):
    cap("AVX2")
    m, info = rounding.resolve("auto", resnet20)
    assert isinstance(m, rounding.AutoMultiple) and m == 8 and info["cpu_capability"] == "AVX2"
    assert not isinstance(m, rounding.BlockMultiple)
    m, info = rounding.resolve("block", resnet20)  # opt-in: the CPU's convolution block, with the block rule
    assert isinstance(m, rounding.BlockMultiple) and m == 8 and info["requested"] == "block"
    cap("AVX512_VNNI")
    m, info = rounding.resolve("block", resnet20)
    assert isinstance(m, rounding.BlockMultiple) and m == 16 and "block rule" in info["rule"] and "16" in info["reason"]
    assert rounding.resolve("auto", resnet20)[0] == 8
    cap("AVX2")
    m, info = rounding.resolve("auto", resnet20.to(torch.bfloat16))
    assert m == 16 and info["dtype"] == "bfloat16"
    assert rounding.resolve(1, resnet20)[0] == 1 and rounding.resolve("8", resnet20)[0] == 8
    assert not isinstance(rounding.resolve(8, resnet20)[0], rounding.AutoMultiple)  # explicit N: torch-pruning's


def test_per_layer_multiple_never_empties_or_oversizes_a_layer():
    m8 = rounding.AutoMultiple(8)
    assert [rounding.layer_multiple(w, m8) for w in (1, 3, 4, 6, 7, 8, 12, 64)] == [1, 1, 2, 2, 2, 8, 8, 8]
    assert rounding.kept_channels(16, 6, m8) == 8     # rounds down to 0 -> one multiple (torch-pruning: keeps 16)
    assert rounding.kept_channels(64, 41, m8) == 40
    assert rounding.kept_channels(64, 47, m8) == 40   # down, not nearest
    assert rounding.kept_channels(12, 9, m8) == 8
    assert rounding.kept_channels(6, 3, m8) == 2      # narrower than the multiple: a power of two <= width/2
    assert rounding.kept_channels(3, 2, m8) == 2      # 1-3 channels: not rounded


def test_block_rule_halves_one_block_layers_and_keeps_the_nearest_multiple():
    """AVX-512's 16: a 16-wide layer may keep 8 (onnxruntime reads narrower inputs unpadded), and wider layers
    keep the nearest multiple of 16, so that a small ratio does not halve every 32-wide layer at once."""
    b16 = rounding.BlockMultiple(16)
    assert [rounding.layer_multiple(w, b16) for w in (8, 16, 17, 32, 64)] == [4, 8, 16, 16, 16]
    assert rounding.layer_multiple(16, rounding.AutoMultiple(16)) == 16  # the plain rule keeps one whole multiple
    assert [rounding.kept_channels(32, k, b16) for k in (31, 25, 24, 23, 9, 1)] == [32, 32, 32, 16, 16, 16]
    assert [rounding.kept_channels(64, k, b16) for k in (41, 39, 55, 57)] == [48, 32, 48, 64]
    assert [rounding.kept_channels(16, k, b16) for k in (15, 12, 11, 3)] == [16, 16, 8, 8]
    assert rounding.finer(b16) == 8 and type(rounding.finer(b16)) is rounding.AutoMultiple  # then the plain rule


def test_default_is_auto_in_library_and_cli():
    assert PruneConfig(ratio=0.5).round_to == "auto"
    from metaprune.cli import build_parser
    args = build_parser().parse_args(["prune", "m.safetensors", "--ratio", "0.5", "-o", "o"])
    assert args.round_to == "auto"


@pytest.mark.parametrize("rt,target,multiple,missed", [("auto", 2.2, 8, []), ("auto", 2.0, 4, [8]),
                                                         ("block", 2.0, 16, []), ("block", 2.2, 8, [16])])
def test_kept_widths_are_multiples_and_the_mac_target_is_met(cap, resnet20, rt, target, multiple, missed, caplog):
    """auto, 2.2x: the table's 8 meets it; 2.0x: with 8 the closest reachable is 1.957x (2.1 % off), so auto
    falls back to 4 and says so. block (AVX-512: 16), 2.0x: met with 16 (16-wide layers keep 8 or 16, wider
    ones multiples of 16); 2.2x: with 16 the closest reachable is 2.03x: 8, plain rule."""
    cap("AVX512")
    before = _convs(resnet20)
    with caplog.at_level("WARNING", logger="metaprune.pruning.engine"):
        res = prune(resnet20, PruneConfig(speedup=target, round_to=rt, criterion="l2"), input_shape=SHAPE)
    # a multiple that missed and was replaced by a finer one that meets the target is no warning
    assert not [r for r in caplog.records if "closest reachable" in r.getMessage()]
    after = _convs(res.model)
    assert any(w != before[n] for n, w in after.items()), "nothing was pruned"
    assert res.info["round_to"]["multiple"] == multiple
    assert [m["multiple"] for m in res.info["round_to"].get("missed", [])] == missed
    # every conv is at least 8 wide here (16/32/64): all kept widths are multiples of the multiple used
    # (block rule: 16-wide layers a multiple of 8)
    assert all(w % (8 if multiple == 16 and before[n] == 16 else multiple) == 0 for n, w in after.items()), after
    assert res.target_met and abs(res.speedup / target - 1) <= 0.02, res.speedup
    if multiple == 16:
        assert any(w == 8 for w in after.values()) and any(w > 16 and w % 16 == 0 and w < before[n]
                                                           for n, w in after.items())
    if multiple == 4:
        assert any(w % 8 for w in after.values())  # 4 was really used


def test_round_to_one_gives_the_exact_unrounded_widths(resnet20):
    before = _convs(resnet20)
    exact = _convs(prune(resnet20, PruneConfig(ratio=0.4, round_to=1), input_shape=SHAPE).model)
    # torch-pruning's uniform ratio keeps int(w * 0.6) of every prunable group: 16->9, 32->19, 64->38
    want = {n: int(w * 0.6) for n, w in before.items()}
    assert exact == want
    auto = _convs(prune(resnet20, PruneConfig(ratio=0.4), input_shape=SHAPE).model)
    assert auto != exact and all(w % 8 == 0 for w in auto.values())


def test_vit_heads_stay_whole_and_mlp_widths_are_rounded(cap):
    cap("AVX2")
    torch.manual_seed(0)
    vit = create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=16).eval()
    attn0 = [m for m in vit.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    dim_head = attn0[0].qkv.out_features // (3 * attn0[0].num_heads)
    res = prune(vit, PruneConfig(ratio=0.4), input_shape=SHAPE)
    attn = [m for m in res.model.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    assert attn and all(a.qkv.out_features == 3 * a.num_heads * dim_head for a in attn)  # head size kept
    assert sum(a.num_heads for a in attn) < sum(a.num_heads for a in attn0)  # heads were removed
    # MLP hidden (768 -> int(768 * 0.6) = 460 -> 456) and residual stream (192 -> 115 -> 112): multiples of 8
    lin = {n: m.out_features for n, m in res.model.named_modules() if isinstance(m, nn.Linear)}
    mlp = [w for n, w in lin.items() if n.endswith(("mlp.0", "mlp.3", "self_attention.proj"))]
    assert len(mlp) == 18 and all(w % 8 == 0 for w in mlp) and min(mlp) < 192, mlp


def test_vgg_widths_are_multiples(cap):
    cap("AVX2")
    torch.manual_seed(0)
    vgg = create_model("cifar_vgg11_bn", num_classes=10, in_chans=1).eval()
    res = prune(vgg, PruneConfig(speedup=2.0), input_shape=(1, 32, 32))
    assert all(w % 8 == 0 for w in _convs(res.model).values())
    assert res.target_met and abs(res.speedup / 2.0 - 1) <= 0.02


def test_report_records_the_multiple_and_latency_per_mac(cap, resnet20, tmp_path, capsys):
    cap("AVX2")
    src = save_model(resnet20, tmp_path / "src.safetensors")
    for flag, mult, cfg in (([], 8, "auto"), (["--round-to", "1"], 1, 1), (["--round-to", "BLOCK"], 8, "block")):
        out = tmp_path / f"o{cfg}"
        assert main(["prune", str(src), "--speedup", "2.2", *flag, "--no-latency", "-o", str(out), "-q"]) == 0
        rep = json.loads((out / "report.json").read_text())
        rt = rep["result"]["round_to"]
        assert rt["multiple"] == mult and rt["reason"] and rep["config"]["round_to"] == cfg
        assert rt.get("requested") == cfg and ("block rule" in rt.get("rule", "")) == (cfg == "block")
        assert "missed" not in rt and rep["result"]["target_met"]
        convs = [w for k, w in rep["widths"]["after"].items() if k != "fc"]
        assert all(w % mult == 0 for w in convs) and (mult == 8 or any(w % 8 for w in convs)), convs
        if cfg == "auto":
            assert rt["cpu_capability"] == "AVX2" and rt["requested"] == "auto" and "AVX2" in rt["reason"]
    r = compare({"macs": 250, "latency": {"64": {"ms": 2.0}}}, {"macs": 100, "latency": {"64": {"ms": 1.0, "speedup": 2.1}}})
    assert r["latency_per_mac_b64"] == pytest.approx(2.1 / 2.5)


@pytest.mark.parametrize("bad", ["0", "-8", "fast", "2.5"])
def test_bad_round_to_is_one_clear_error(tmp_path, resnet20, bad, capsys):
    src = save_model(resnet20, tmp_path / "src.safetensors")
    assert main(["prune", str(src), "--ratio", "0.5", "--round-to", bad, "--no-latency", "-o", str(tmp_path / "o"),
                 "-q"]) == 2
    assert capsys.readouterr().err.startswith("error: --round-to")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_target_missed_in_the_end_warns_once(resnet20, caplog):
    """A fixed multiple that cannot reach the target: one warning, and the result says so."""
    with caplog.at_level("WARNING", logger="metaprune.pruning.engine"):
        res = prune(resnet20, PruneConfig(speedup=2.0, round_to=8, criterion="l2"), input_shape=SHAPE)
    warned = [r for r in caplog.records if "closest reachable" in r.getMessage()]
    assert not res.target_met and len(warned) == 1 and f"{res.speedup:.3f}x" in warned[0].getMessage()
