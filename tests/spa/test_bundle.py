"""Bundles: masked model == merged dense model, masks enforced, hash and truncation errors."""

import json
import shutil

import pytest
import torch

from metaprune.errors import BundleError
from metaprune.io import load_model, save_model
from spa import adapt_model, learned_parameters, load_bundle, merge, save_bundle
from spa.adapt import _NORMS
from spa.masks import step_keep
from spa.methods import get_method
from spa.prune import apply_masks, build_graph, channel_groups, layer_masks

SHAPE = (1, 28, 28)


def _pruned_adapted(source, method, ratio=0.5):
    cfg_cls, _ = get_method(method)
    m = adapt_model(source, method, cfg_cls(rank=3), num_classes=4, seed=0).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    dg = build_graph(m, torch.zeros(1, *SHAPE))
    groups = channel_groups(m, dg, m.get_submodule(m.spa_head))
    lm = layer_masks(m, groups, step_keep(m, groups, ratio))
    apply_masks(m, lm)
    mods = dict(m.named_modules())
    m.spa_norm_masks = {n: d["out"] for n, d in lm.items() if isinstance(mods[n], _NORMS)}
    return m, groups


def _save(m, method, src_model, out):
    cfg_cls, _ = get_method(method)
    from metaprune.io import state_dict_sha256

    return save_bundle(m, out, method=method, method_config=cfg_cls(rank=3), task="t", classes=list("abcd"),
                       source_sha256=state_dict_sha256(src_model), input_shape=SHAPE)


@pytest.mark.parametrize("method", ["splora", "sppara", "hydra"])
def test_merged_equals_masked(source_path, tmp_path, method):
    src, _ = load_model(source_path)
    src.eval()
    m, groups = _pruned_adapted(src, method)
    assert len(groups) == 12  # stem+stage residual groups and one per block's inner conv
    x = torch.randn(3, *SHAPE)
    y_fp32 = m(x)
    bundle = _save(m, method, src, tmp_path / "b")
    assert torch.equal(m(x), y_fp32)  # saving leaves the model alone
    cfg = json.loads((bundle / "adapter_config.json").read_text())
    assert cfg["value_dtype"] == "float16" and cfg["format_version"] == 2
    # the bundle holds the model rounded (float16 values, BN statistics folded): close, not equal ...
    loaded = load_bundle(bundle, src)
    y_masked = loaded(x)
    assert 0 < (y_masked - y_fp32).abs().max() <= 5e-2
    # ... and merging reproduces exactly what loading gives
    y_loaded = load_bundle(bundle, src)(x)
    dense = merge(bundle, src)
    assert not any("spa" in type(mod).__module__ for mod in dense.modules())
    y_dense = dense(x)
    assert (y_loaded - y_masked).abs().max() <= 1e-5
    assert (y_dense - y_masked).abs().max() <= 1e-5
    # fewer parameters and reloadable as a plain registered model
    assert sum(p.numel() for p in dense.parameters()) < 0.5 * sum(p.numel() for p in src.parameters())
    path = save_model(dense, tmp_path / "merged.safetensors")
    again, info = load_model(path)
    assert info.arch == "cifar_resnet20"
    assert (again.eval()(x) - y_masked).abs().max() <= 1e-5
    # the bundle is a small fraction of the dense pruned model
    bundle_bytes = (bundle / "adapter_model.safetensors").stat().st_size
    assert bundle_bytes < 0.25 * path.stat().st_size
    if method == "splora":  # rank 3 at 50% pruned: masks + float16 values, no running statistics
        assert bundle_bytes < 0.06 * path.stat().st_size


def test_round_model_is_idempotent_and_format1_loads(source_path, tmp_path):
    """Saving a loaded bundle again gives the same values; a format-1 bundle (float32 + statistics) still loads."""
    from safetensors.torch import load_file, save_file

    from spa.bundle import _mask_slots, _pack_bits, _value_slots, layer_masks_of, round_model_

    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    x = torch.randn(2, *SHAPE)
    # format 1: float32 values with running statistics, written by hand as the old writer did
    masks = layer_masks_of(m)
    parts = []
    for name, tname, mod, dims in _value_slots(m, fold_stats=False):
        t = getattr(mod, tname).detach().float()
        for ax, d in enumerate(dims):
            if d is not None:
                t = t.index_select(ax, masks[name][d].nonzero().flatten())
        parts.append(t.reshape(-1))
    y_fp32 = m(x)
    b1 = _save(m, "splora", src, tmp_path / "b1")
    cfg = json.loads((b1 / "adapter_config.json").read_text())
    for k in ("value_dtype", "norm_stats"):
        del cfg[k]
    cfg.update(format_version=1, layout="packed-v1", n_values=int(sum(p.numel() for p in parts)))
    bits = torch.cat([masks[n][d] for n, d, _ in _mask_slots(m)])
    save_file({"masks": _pack_bits(bits), "values": torch.cat(parts)}, str(b1 / "adapter_model.safetensors"))
    (b1 / "adapter_config.json").write_text(json.dumps(cfg))
    assert (load_bundle(b1, src)(x) - y_fp32).abs().max() <= 1e-5
    # the bundle's model is a fixed point: rounding it changes nothing, saving it again writes the same values
    b2 = _save(m, "splora", src, tmp_path / "b2")
    loaded = load_bundle(b2, src)
    y = loaded(x)
    assert round_model_(loaded) == torch.float16 and torch.equal(loaded(x), y)
    b3 = _save(loaded, "splora", src, tmp_path / "b3")
    v2, v3 = (load_file(str(b / "adapter_model.safetensors")) for b in (b2, b3))
    # identical tensors (the file header's metadata order is up to safetensors and may differ)
    assert torch.equal(v2["masks"], v3["masks"]) and torch.equal(v2["values"], v3["values"])


def test_save_bundle_has_no_side_effects(source_path, tmp_path):
    """Saving changes nothing in the caller's model: parameters, buffers, flags, train- and eval-mode outputs."""
    import copy

    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    twin = copy.deepcopy(m)
    flags = [p.requires_grad for p in m.parameters()]
    _save(m, "splora", src, tmp_path / "b")
    before, after = twin.state_dict(), m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in m.parameters()]
    x = torch.randn(8, *SHAPE)
    assert torch.equal(m.eval()(x), twin.eval()(x))
    assert torch.equal(m.train()(x), twin.train()(x))  # folding BN statistics would change these (batch stats)


def test_pruned_channels_have_no_effect(source_path):
    """Masks are enforced: changing anything that belongs to a pruned channel leaves the output unchanged."""
    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    x = torch.randn(2, *SHAPE)
    y = m(x)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "out_mask"):
                dead_o, dead_i = mod.out_mask == 0, mod.in_mask == 0
                if hasattr(mod, "lora_A"):
                    mod.lora_B[dead_o] += 5.0
                    mod.lora_A[:, dead_i] += 5.0
                mod.weight[dead_o] += 5.0
        for name, mask in m.spa_norm_masks.items():
            bn = m.get_submodule(name)
            bn.bias[~mask] += 5.0
            bn.weight[~mask] += 5.0
    assert (m(x) - y).abs().max() <= 1e-5
    # learned parameters follow the counting rule: adapters r*(in+out) over kept channels + norms + head
    lp = learned_parameters(m)
    assert lp["total"] == lp["adapter"] + lp["bias"] + lp["norm"] + lp["head"] > 0
    expect = sum(3 * int(mod.out_mask.sum() + mod.in_mask.sum()) for n, mod in m.named_modules()
                 if hasattr(mod, "lora_A"))
    assert lp["adapter"] == expect


def test_wrong_source_names_both_hashes(source_path, tmp_path):
    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    bundle = _save(m, "splora", src, tmp_path / "b")
    other, _ = load_model(source_path)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    from metaprune.io import state_dict_sha256

    want = json.loads((bundle / "adapter_config.json").read_text())["source_sha256"]
    with pytest.raises(BundleError) as e:
        merge(bundle, other)
    assert want in str(e.value) and state_dict_sha256(other) in str(e.value)


def test_truncated_or_incomplete_bundle(source_path, tmp_path):
    src, _ = load_model(source_path)
    m, _ = _pruned_adapted(src.eval(), "splora")
    bundle = _save(m, "splora", src, tmp_path / "b")
    w = bundle / "adapter_model.safetensors"
    data = w.read_bytes()
    bad = tmp_path / "trunc"
    shutil.copytree(bundle, bad)
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        merge(bad, src)
    (bad / "adapter_config.json").write_text('{"format_version": 1, "meth')
    with pytest.raises(BundleError, match="truncated"):
        merge(bad, src)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(BundleError, match="adapter_config.json is missing"):
        merge(bad, src)
    # a bundle of another method does not load silently
    cfg = json.loads((bundle / "adapter_config.json").read_text())
    cfg["method"], cfg["method_config"] = "sppara", {"rank": 3}
    shutil.copy(w, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="another architecture or method"):
        merge(bad, src)
