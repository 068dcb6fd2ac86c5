"""Parity of ``metaprune.pruning.prune`` with torch-pruning's own ``MetaPruner``.

For each torchvision classification builder (small input, 10 classes, eval mode, seed 0) both prune
the same model at the same ratio with the same criterion (L2 group magnitude,
``tp.importance.GroupMagnitudeImportance(p=2)``), the same ignored layer (the classifier, as
``metaprune.pruning.structure.find_classifier`` finds it) and ``round_to=1``; the table compares every
conv / linear layer's output width and the MACs of the two pruned models.

    .venv/bin/python tools/tp_parity.py                 # the 28 builders below -> results/tp_parity.{json,md}
    .venv/bin/python tools/tp_parity.py resnet18 swin_t # some builders, printed only
    .venv/bin/python tools/tp_parity.py --skip maxvit_t  # all but some (still writes the table)

Each builder runs in a child process whose address space is capped (``--mem-gb``, default 6): a builder
that needs more (MaxViT at 224 px took > 10 GB and was OOM-killed on the 23 GB machine shared by other
jobs) is recorded as ``error`` with the reason instead of taking the machine down.

``compare(name)`` is what ``tests/pruning/test_tp_parity.py`` runs.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metaprune.engine.measure import count_macs  # noqa: E402
from metaprune.graph.coverage import builder_config  # noqa: E402
from metaprune.pruning import PruneConfig, prune  # noqa: E402
from metaprune.pruning.structure import find_classifier  # noqa: E402

RATIO = 0.5
#: one or two builders per torchvision family (the smallest variants; the big ones of a family add
#: nothing the small one does not show and take minutes each on a CPU)
BUILDERS = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_large",
            "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d",
            "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t",
            "vgg11", "vgg11_bn", "vit_b_16", "wide_resnet50_2")


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    cfg = builder_config(name)  # 64 px (75 px Inception, 32 px ViT, 224 px MaxViT), no aux heads
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **cfg.kwargs).eval()
    return model, torch.randn(1, 3, *cfg.input_shape[2:])


def widths(model: nn.Module) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[n] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[n] = int(m.out_features)
        elif isinstance(m, nn.MultiheadAttention):
            out[n + ".embed_dim"] = int(m.embed_dim)
    return out


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float = RATIO) -> nn.Module:
    """torch-pruning 1.6's documented recipe, nothing metaprune-specific but the classifier's name."""
    m = copy.deepcopy(model)
    clf = dict(m.named_modules())[find_classifier(model)[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[clf], round_to=1)
        pruner.step()
    return m


def mp_prune(model: nn.Module, x: torch.Tensor, ratio: float = RATIO) -> nn.Module:
    cfg = PruneConfig(ratio=ratio, criterion="l2", round_to=1)
    return prune(model, cfg, example_input=x).model


def _run(fn, model, x):
    try:
        return fn(model, x), None
    except Exception as e:  # noqa: BLE001 - the table records what each side raised
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def compare(name: str) -> dict:
    """Prune builder ``name`` both ways; ``status``: ``same`` (every width and the MACs equal),
    ``differ`` (``diff`` lists the layers), or ``error`` (``tp_error`` / ``mp_error``)."""
    model, x = build(name)
    shape = tuple(x.shape[1:])
    t0 = time.perf_counter()
    macs0 = count_macs(model, shape)
    tpm, tp_err = _run(tp_prune, model, x)
    mpm, mp_err = _run(mp_prune, model, x)
    row: dict = {"name": name, "input": list(x.shape), "macs_before": macs0, "tp_error": tp_err, "mp_error": mp_err}
    for key, m, err in (("tp", tpm, "tp_error"), ("mp", mpm, "mp_error")):
        if m is not None:  # a pruned model that no longer runs is that side's error
            macs, e = _run(lambda mm, xx: count_macs(mm, tuple(xx.shape[1:])), m, x)
            if e is None:
                row[f"{key}_macs"] = macs
            else:
                row[err] = f"the pruned model does not run ({e})"
    if tpm is None or mpm is None:
        row["status"] = "error"
    else:
        wt, wm = widths(tpm), widths(mpm)
        row["diff"] = {n: {"tp": wt.get(n), "mp": wm.get(n)} for n in sorted(set(wt) | set(wm)) if wt.get(n) != wm.get(n)}
        row["layers"] = len(wt)
        if row.get("tp_macs") is None or row.get("mp_macs") is None:  # widths comparable, one side does not run
            row["status"] = "same widths, " + ("torch-pruning's" if row.get("tp_macs") is None else "metaprune's") + \
                " model does not run" if not row["diff"] else "differ"
        else:
            row["status"] = "same" if not row["diff"] and row["tp_macs"] == row["mp_macs"] else "differ"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _md(rows: list[dict]) -> str:
    same = sum(r["status"] == "same" for r in rows)
    lines = [f"# metaprune vs torch-pruning MetaPruner: {same} of {len(rows)} builders give the same widths",
             "",
             f"Ratio {RATIO}, L2 group magnitude, classifier ignored, round_to=1, 10 classes, eval mode, seed 0 "
             f"(torch-pruning {tp.__version__}). `tools/tp_parity.py` writes this table.",
             "",
             "| builder | input | MACs before | torch-pruning MACs | metaprune MACs | status | detail |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r["status"] == "error":
            detail = r.get("note") or "; ".join(f"{k}: {r[k]}" for k in ("tp_error", "mp_error") if r.get(k))
        elif r["status"].startswith("same widths"):
            detail = f"all {r['layers']} layers; " + "; ".join(r[k] for k in ("tp_error", "mp_error") if r.get(k))
        elif r["status"] == "differ":
            items = list(r["diff"].items())
            detail = f"{len(items)} of {r['layers']} layers differ, e.g. " + ", ".join(
                f"{n} tp {d['tp']} / mp {d['mp']}" for n, d in items[:3])
        else:
            detail = f"all {r['layers']} layers"
        fmt = lambda v: f"{v / 1e6:.1f} M" if isinstance(v, int) else "-"  # noqa: E731
        lines.append(f"| {r['name']} | {r['input'][-1] or '-'} px | {fmt(r['macs_before'])} | {fmt(r.get('tp_macs'))} | "
                     f"{fmt(r.get('mp_macs'))} | {r['status']} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _child(name: str, mem_gb: float, timeout: float) -> dict:
    import subprocess

    code = (f"import resource, sys, json; resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gb * 2**30)}, "
            f"{int(mem_gb * 2**30)})); sys.path.insert(0, {str(ROOT / 'tools')!r}); import tp_parity; "
            f"print('ROW' + json.dumps(tp_parity.compare({name!r})))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "error", "tp_error": None, "mp_error": None, "input": [1, 3, 0, 0],
                "macs_before": None, "note": f"not run: over {timeout:.0f} s on this machine"}
    for line in proc.stdout.splitlines():
        if line.startswith("ROW"):
            return json.loads(line[3:])
    tail = (proc.stderr.strip().splitlines() or ["killed"])[-1][:200]
    return {"name": name, "status": "error", "tp_error": None, "mp_error": None, "input": [1, 3, 0, 0],
            "macs_before": None, "note": f"not run: the child process failed under a {mem_gb:g} GB cap ({tail})"}


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--mem-gb", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    names = [n for n in (args.names or BUILDERS) if n not in args.skip]
    rows = []
    for n in names:
        r = _child(n, args.mem_gb, args.timeout)
        rows.append(r)
        print(f"{n:22s} {r['status']:7s} tp {r.get('tp_macs')} mp {r.get('mp_macs')} "
              f"{r.get('tp_error') or ''} {r.get('mp_error') or ''} {len(r.get('diff', {}))} diff  {r.get('seconds')} s {r.get('note') or ''}",
              flush=True)
    if not args.names:
        out = ROOT / "results"
        (out / "tp_parity.json").write_text(json.dumps({"ratio": RATIO, "torch_pruning": tp.__version__,
                                                        "rows": rows}, indent=1) + "\n")
        (out / "tp_parity.md").write_text(_md(rows))
    print(f"{sum(r['status'] == 'same' for r in rows)} of {len(rows)} same")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
