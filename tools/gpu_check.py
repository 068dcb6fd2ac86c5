"""GPU check: every stage on CUDA, with figures (run by tools/gpu_check.sh on a GPU machine).

Sections (each timed, each failure recorded instead of aborting the rest): graph round trips on GPU
models, metanetwork forward+backward on the ResNet-50 and ViT-B/16 graphs at the largest hidden size that
fits, pruning of ResNet-50 (2x MACs) and ViT-B/16 heads (50%), GPU latency base vs pruned at batch 1 and 256
in fp32 and bf16, and one AMP epoch of train + finetune on Fashion-MNIST. Results: $OUT/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: dict = {}
OUT = Path(os.environ.get("OUT") or "results")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
T0 = time.time()


def section(name: str):
    def deco(fn):
        def run(*a, **kw):
            if time.time() - T0 > BUDGET_S:
                RESULTS[name] = {"skipped": "time budget spent"}
                return None
            t = time.time()
            try:
                RESULTS[name] = fn(*a, **kw)
                RESULTS[name]["seconds"] = round(time.time() - t, 2)
            except Exception as e:  # noqa: BLE001 - record and go on
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            torch.cuda.empty_cache()
            _dump()
            print(f"[{name}] {json.dumps(RESULTS[name])[:300]}", flush=True)
            return RESULTS[name]
        return run
    return deco


def _dump() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=2, default=str))
    tmp.replace(OUT / "gpu_check.json")


DEV = torch.device("cuda")


@section("convert_round_trip")
def convert_round_trip() -> dict:
    from metaprune.graph import from_graph, to_graph
    from metaprune.models import create_model

    out = {}
    for name, kw, shape in (("cifar_resnet56", {}, (3, 32, 32)), ("cifar_vgg19_bn", {}, (3, 32, 32)),
                            ("resnet50", {}, (3, 224, 224)), ("vit_b_16", {}, (3, 224, 224))):
        m = create_model(name, num_classes=10, **kw).to(DEV).eval()
        t = time.time()
        g = to_graph(m)
        t1 = time.time()
        back = from_graph(g).to(DEV).eval()
        t2 = time.time()
        exact = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
        x = torch.randn(2, *shape, device=DEV)
        with torch.no_grad():
            same = torch.equal(m(x), back(x))
        out[name] = {"nodes": g.num_nodes, "edges": g.num_edges, "to_graph_s": t1 - t, "from_graph_s": t2 - t1,
                     "exact": exact, "outputs_equal": same}
        del m, back, g
    return out


@section("metanet_memory")
def metanet_memory() -> dict:
    from metaprune.graph import to_graph
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet
    from metaprune.models import create_model

    out = {}
    for arch, hiddens in (("resnet50", (64, 48, 32, 16)), ("vit_b_16", (32, 24, 16, 8))):
        g = to_graph(create_model(arch, num_classes=1000)).to(DEV)
        out[arch] = {"edges": g.num_edges, "tried": []}
        for h in hiddens:
            torch.cuda.reset_peak_memory_stats()
            try:
                net = Metanet.for_graph(g, MetanetConfig(hidden=h, layers=4, edit="residual", edge_chunk=2_000_000,
                                                         checkpoint=True)).to(DEV)
                t = time.time()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    x, ea = net(g)
                loss = x.float().square().mean() + sum(v.float().square().mean() for v in ea.values())
                loss.backward()
                torch.cuda.synchronize()
                rec = {"hidden": h, "layers": 4, "fwd_bwd_s": time.time() - t,
                       "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "ok": True}
                out[arch]["tried"].append(rec)
                out[arch]["largest_hidden_that_fits"] = h
                del net, x, ea, loss
                break
            except torch.OutOfMemoryError:
                out[arch]["tried"].append({"hidden": h, "ok": False, "oom": True})
                torch.cuda.empty_cache()
        del g
    return out


def _latency_table(base, pruned, shape) -> dict:
    from metaprune.engine import measure_latency

    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        for b in (1, 256):
            lb = measure_latency(base, shape, b, DEV, dtype, warmup=5, repeats=20)["ms"]
            lp = measure_latency(pruned, shape, b, DEV, dtype, warmup=5, repeats=20)["ms"]
            rows[f"{str(dtype).removeprefix('torch.')}_b{b}"] = {"base_ms": lb, "pruned_ms": lp, "speedup": lb / lp}
    return rows


@section("prune_resnet50_2x")
def prune_resnet50() -> dict:
    from metaprune.models import create_model
    from metaprune.pruning import PruneConfig, prune

    m = create_model("resnet50", num_classes=1000).to(DEV).eval()
    res = prune(m, PruneConfig(speedup=2.0, round_to=8), input_shape=(3, 224, 224))
    return {"mac_speedup": res.speedup, "params_reduction": res.params_reduction,
            "latency": _latency_table(create_model("resnet50", num_classes=1000).to(DEV), res.model.to(DEV),
                                      (3, 224, 224))}


@section("prune_vit_b_16_heads")
def prune_vit() -> dict:
    from metaprune.models import create_model
    from metaprune.pruning import PruneConfig, prune

    m = create_model("vit_b_16", num_classes=1000).to(DEV).eval()
    res = prune(m, PruneConfig(ratio=0.5), input_shape=(3, 224, 224))
    heads = [blk.self_attention.num_heads for blk in res.model.encoder.layers]
    return {"heads_per_layer": heads, "heads_before": res.heads_before, "mac_speedup": res.speedup,
            "latency": _latency_table(create_model("vit_b_16", num_classes=1000).to(DEV), res.model.to(DEV),
                                      (3, 224, 224))}


@section("train_finetune_amp")
def train_amp() -> dict:
    from metaprune.data import load_dataset
    from metaprune.engine import TrainConfig, evaluate, train
    from metaprune.models import create_model

    try:
        data = load_dataset("fashion-mnist")
    except Exception:  # noqa: BLE001 - no data on the GPU machine: synthetic, and say so
        data = load_dataset("synthetic", in_chans=1, image_size=28, num_classes=10)
    m = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    t = time.time()
    r = train(m, data, TrainConfig(epochs=1, device="cuda", amp=True, batch_size=256, lr=0.2))
    t_train = time.time() - t
    t = time.time()
    r2 = train(r.model, data, TrainConfig(epochs=1, device="cuda", amp=True, batch_size=256, lr=0.01, schedule="cosine"))
    return {"data": data.name, "train_epoch_s": t_train, "finetune_epoch_s": time.time() - t,
            "val_acc": r.best_val_acc, "val_acc_after_finetune": r2.best_val_acc,
            "test_acc": evaluate(r2.model, data.test, device=DEV, amp=True)["acc"]}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible; nothing to check", file=sys.stderr)
        return 1
    RESULTS["device"] = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    for fn in (convert_round_trip, prune_resnet50, prune_vit, train_amp, metanet_memory):
        fn()
    RESULTS["total_s"] = round(time.time() - T0, 1)
    _dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
