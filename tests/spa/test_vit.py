"""SPA on Vision Transformers: whole heads and MLP channels pruned, merged model == masked model.

The residual width (LayerNorm, class token, position embedding) is kept: masking a residual
channel is not its removal (LayerNorm statistics run over every channel), so those groups are
never masked.
"""

import json
import time

import pytest
import torch

from metaprune.cli import main
from metaprune.io import load_model, save_model, state_dict_sha256
from metaprune.models import create_model
from spa import adapt_model, load_bundle, merge, save_bundle
from spa.adapt import _NORMS
from spa.masks import current_keep, step_keep
from spa.methods import get_method
from spa.prune import apply_masks, build_graph, channel_groups, layer_masks

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=28).eval()
    with torch.no_grad():  # the source's position embedding is zeros at init: make it matter
        m.encoder.pos_embedding.normal_(0, 0.5)
        m.class_token.normal_(0, 0.5)
    return m, str(save_model(m, tmp_path_factory.mktemp("vit") / "vit.safetensors"))


@pytest.fixture(scope="module")
def small_vit_source(tmp_path_factory):
    """vit_tiny_p4 at 12 px (9 patches): the CLI tests' synthetic data are shaped to it, and run fast."""
    torch.manual_seed(1)
    m = create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=12).eval()
    with torch.no_grad():
        m.encoder.pos_embedding.normal_(0, 0.5)
    return str(save_model(m, tmp_path_factory.mktemp("vit12") / "vit12.safetensors"))


def _adapted(src, rank=3, seed=3):
    cfg_cls, _ = get_method("splora")
    m = adapt_model(src, "splora", cfg_cls(rank=rank), num_classes=4, seed=0).eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # as if trained: non-zero up-projections, changed biases and norms
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m


def _prune(m, groups, ratio):
    lm = layer_masks(m, groups, step_keep(m, groups, ratio))
    apply_masks(m, lm)
    mods = dict(m.named_modules())
    m.spa_norm_masks = {n: d["out"] for n, d in lm.items() if isinstance(mods[n], _NORMS)}


def test_vit_groups_whole_heads_and_mlp_fast(vit_source):
    src, _ = vit_source
    m = _adapted(src)
    dg = build_graph(m, torch.zeros(1, *SHAPE))
    traced = {dg._module2name.get(k) for k in dg.module2node}
    # the frozen patch embedding and the bare class token / position embedding are in the graph
    assert "conv_proj" in traced
    assert any(isinstance(k, torch.nn.Parameter) and k is m.encoder.pos_embedding for k in dg.module2node)
    t0 = time.perf_counter()
    groups = channel_groups(m, dg, m.get_submodule(m.spa_head))
    assert time.perf_counter() - t0 < 30  # ~1 s on one core (minutes before, then an IndexError)
    mods = dict(m.named_modules())
    heads = [g for g in groups if g.attention is not None]
    mlps = [g for g in groups if g.attention is None]
    assert len(heads) == 6 and len(mlps) == 6
    for i, g in enumerate(heads):
        assert g.root == f"encoder.layers.encoder_layer_{i}.self_attention.qkv" and g.size == 3
        qkv = {mem.dim: mem for mem in g.members if mem.name == g.root}["out"]
        proj = [mem for mem in g.members if mem.name.endswith("proj")]
        assert len(g.members) == 2 and len(proj) == 1 and proj[0].dim == "in"
        # unit k = head k: its q, k and v rows of qkv and its 64 columns of proj
        rows = torch.tensor(qkv.idxs).view(-1, 3)
        for k in range(3):
            assert sorted(rows[:, k].tolist()) == [s * 192 + k * 64 + d for s in range(3) for d in range(64)]
            assert sorted(torch.tensor(proj[0].idxs).view(-1, 3)[:, k].tolist()) == list(range(64 * k, 64 * k + 64))
    for g in mlps:
        assert g.root.endswith("mlp.0") and g.size == 768
        assert [(mem.name.rsplit(".", 1)[1], mem.dim) for mem in g.members] == [("0", "out"), ("3", "in")]
    # no group reaches a LayerNorm (the residual width is kept) and every index fits its layer
    for g in groups:
        for mem in g.members:
            mod = mods[mem.name]
            assert not isinstance(mod, torch.nn.LayerNorm)
            size = mod.out_channels if mem.dim == "out" else mod.in_channels
            assert max(mem.idxs) < size and len(set(mem.idxs)) == len(mem.idxs) == size


def test_vit_splora_bundle_merge_equals_masked(vit_source, tmp_path):
    src, src_path = vit_source
    m = _adapted(src)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        y_full = m(x)
    dg = build_graph(m, torch.zeros(1, *SHAPE))
    groups = channel_groups(m, dg, m.get_submodule(m.spa_head))
    _prune(m, groups, 0.5)
    kept = {g.root: current_keep(m, g) for g in groups}
    assert all(int(kept[g.root].sum()) == (2 if g.attention else 384) for g in groups)
    with torch.no_grad():
        y_masked = m(x)
        assert (y_masked - y_full).abs().max() > 1e-2  # masking changed the function
        # a pruned head's weights (q, k, v rows and proj columns) and a pruned MLP channel have no effect
        attn = m.encoder.layers[2].self_attention
        gone = int((~kept["encoder.layers.encoder_layer_2.self_attention.qkv"]).nonzero()[0])
        rows = [s * 192 + gone * 64 + d for s in range(3) for d in range(64)]
        attn.qkv.weight[rows] += 1.0
        attn.qkv.lora_B[rows] += 1.0
        attn.proj.weight[:, gone * 64:(gone + 1) * 64] += 1.0
        mlp = m.encoder.layers[4].mlp
        ch = int((~kept["encoder.layers.encoder_layer_4.mlp.0"]).nonzero()[0])
        mlp[0].weight[ch] += 1.0
        mlp[3].lora_A[:, ch] += 1.0
        assert (m(x) - y_masked).abs().max() == 0
    cfg_cls, _ = get_method("splora")
    bundle = save_bundle(m, tmp_path / "b", method="splora", method_config=cfg_cls(rank=3), task="t",
                         classes=list("abcd"), source_sha256=state_dict_sha256(src), input_shape=SHAPE)
    with torch.no_grad():
        loaded = load_bundle(bundle, src)
        y_loaded = loaded(x)
        assert (y_loaded - y_masked).abs().max() <= 5e-2  # float16 values in the bundle
        dense = merge(bundle, src)
        y_dense = dense(x)
    assert (y_dense - y_loaded).abs().max() <= 1e-4
    assert not any("spa" in type(mod).__module__ for mod in dense.modules())
    # fewer heads (head size kept), half the MLP channels, residual width, tokens and embeddings kept
    for layer in dense.encoder.layers:
        a = layer.self_attention
        assert a.num_heads == 2 and a.head_dim == 64 and a.qkv.out_features == 384 and a.proj.in_features == 128
        assert layer.mlp[0].out_features == 384 and layer.mlp[3].in_features == 384
        assert layer.ln_1.normalized_shape == (192,)
    assert dense.hidden_dim == 192 and dense.class_token.shape == (1, 1, 192)
    assert torch.equal(dense.encoder.pos_embedding, src.encoder.pos_embedding)
    assert sum(p.numel() for p in dense.parameters()) < 0.6 * sum(p.numel() for p in src.parameters())
    # the merged model is a plain registered model that reloads
    path = save_model(dense, tmp_path / "merged.safetensors")
    again, info = load_model(path)
    assert info.arch == "vit_tiny_p4"
    assert [a.self_attention.num_heads for a in again.encoder.layers] == [2] * 6
    with torch.no_grad():
        assert (again.eval()(x) - y_loaded).abs().max() <= 1e-4
    # `metaprune merge` on the same bundle gives the same model
    out = tmp_path / "cli_merged.safetensors"
    assert main(["merge", str(bundle), "--source", src_path, "-o", str(out), "-q"]) == 0
    cli_model, _ = load_model(out)
    with torch.no_grad():
        assert (cli_model.eval()(x) - y_dense).abs().max() <= 1e-6


def test_vit_adapt_merge_cli(small_vit_source, tmp_path):
    """`metaprune adapt SOURCE --task synthetic` on a ViT source, then merge and eval."""
    src_path = small_vit_source
    out = tmp_path / "bundle"
    rc = main(["adapt", src_path, "--task", "synthetic", "--method", "splora", "--rank", "2", "--ratio", "0.5",
               "--steps", "1", "--warmup-epochs", "0", "--recovery-epochs", "1", "--max-steps-per-epoch", "2",
               "--min-steps", "0", "--batch-size", "16", "--device", "cpu", "-q", "-o", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dependency_groups"] == 12  # 6 attention (whole heads) + 6 MLP groups
    assert report["macs"]["pruned"] < 0.7 * report["macs"]["source"]
    assert report["bundle_bytes"] < 0.1 * report["dense_pruned_bytes"]
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(out), "--source", src_path, "-o", str(merged), "-q"]) == 0
    model, info = load_model(merged)
    assert info.arch == "vit_tiny_p4" and model.heads.head.out_features == 4
    assert [layer.self_attention.num_heads for layer in model.encoder.layers] == [2] * 6
    src, _ = load_model(src_path)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        y = load_bundle(out, src.eval())(x)
        assert (model.eval()(x) - y).abs().max() <= 1e-4
    assert main(["eval", str(merged), "--data", "synthetic", "--no-latency", "--json", "-q"]) == 0


@pytest.mark.slow
def test_vit_prune_task_cli(small_vit_source, tmp_path):
    """`metaprune prune SOURCE --ratio R --task T` writes one ViT bundle per task."""
    src_path = small_vit_source
    rc = main(["prune", src_path, "--ratio", "0.5", "--task", "synthetic", "--epochs", "1", "--max-steps-per-epoch",
               "1", "--batch-size", "16", "--device", "cpu", "-q", "-o", str(tmp_path / "bundles")])
    assert rc == 0
    report = json.loads((tmp_path / "bundles" / "synthetic" / "report.json").read_text())
    assert report["dependency_groups"] == 12 and report["macs"]["pruned"] < 0.7 * report["macs"]["source"]


@pytest.mark.slow
def test_vit_b_16_merge_equals_masked(tmp_path):
    """ViT-B/16 (at 32 px: 4 patches) loses half its heads and MLP channels; merged == masked."""
    torch.manual_seed(0)
    src = create_model("vit_b_16", num_classes=10, in_chans=3, image_size=32).eval()
    shape = (3, 32, 32)
    m = _adapted(src, rank=2)
    dg = build_graph(m, torch.zeros(1, *shape))
    t0 = time.perf_counter()
    groups = channel_groups(m, dg, m.get_submodule(m.spa_head))
    assert time.perf_counter() - t0 < 60
    assert sorted((g.attention is not None, g.size) for g in groups) == [(False, 3072)] * 12 + [(True, 12)] * 12
    _prune(m, groups, 0.5)
    cfg_cls, _ = get_method("splora")
    bundle = save_bundle(m, tmp_path / "b", method="splora", method_config=cfg_cls(rank=2), task="t",
                         classes=list("abcd"), source_sha256=state_dict_sha256(src), input_shape=shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y = load_bundle(bundle, src)(x)
        dense = merge(bundle, src)
        assert (dense(x) - y).abs().max() <= 1e-4
    assert [layer.self_attention.num_heads for layer in dense.encoder.layers] == [6] * 12
    assert all(layer.mlp[0].out_features == 1536 for layer in dense.encoder.layers)
