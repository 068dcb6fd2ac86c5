"""Converter coverage table over every torchvision classification builder.

For each builder of ``torchvision.models.list_models(module=torchvision.models)`` (small
``num_classes``, small input: see :func:`metaprune.graph.coverage.builder_config`): build it, convert
it with ``to_graph(model, input_shape=...)``, rebuild it with ``from_graph(graph, template=...)``
onto a NaN-filled copy and compare every tensor and the outputs. Each builder is ``exact``,
``refused: <the GraphError>`` or ``failed: <exception>`` (a bug). A builder with more than ``--max-params`` parameters runs with its
repeated blocks cut to two per stage (same widths and layer types; marked "reduced depth"). Writes
results/convert_coverage.json and results/convert_coverage.md.

    OMP_NUM_THREADS=1 .venv/bin/python tools/convert_coverage.py [--only resnet18 vit_b_16] [--max-params 150e6]

``--timm``: the same check over :data:`TIMM_MODELS` (the 20 timm models of results/ecosystem_cli.md;
``timm.create_model(NAME, pretrained=False, num_classes=10)`` at 64 px, 32 px for the ViTs / ResMLP via
``img_size``); writes results/convert_coverage_timm.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python tools/convert_coverage.py --timm [--only convnext_atto]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


#: the 20 timm models tried in results/ecosystem_cli.md (timm through the converter)
TIMM_MODELS = ["resnet18", "resnet50", "mobilenetv3_small_050", "mobilenetv2_050", "efficientnet_b0", "convnext_atto",
               "regnetx_002", "regnety_002", "ghostnet_050", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
               "densenet121", "vgg11_bn", "lcnet_050", "mixnet_s", "rexnet_100", "dla34", "seresnext26d_32x4d",
               "poolformer_s12", "resmlp_12_224"]


def timm_config(name: str) -> tuple[dict, tuple[int, int, int, int]]:
    """timm.create_model kwargs and input shape of ``name``: 64 px; ViTs / ResMLP (fixed patch grid) at 32 px."""
    kw: dict = {"pretrained": False, "num_classes": 10}
    size = 64
    if name.startswith(("vit_", "deit_", "resmlp_")):
        size = 32
        kw["img_size"] = size
    return kw, (2, 3, size, size)


def check_timm(name: str) -> dict:
    """:func:`metaprune.graph.coverage.check_model` on timm model ``name`` (BatchNorm statistics made non-trivial)."""
    import timm
    import torch
    from torch import nn

    from metaprune.graph.coverage import check_model

    kw, shape = timm_config(name)
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, **kw).eval()
    except Exception as e:  # noqa: BLE001
        return {"status": "failed", "detail": f"building it: {type(e).__name__}: {str(e).splitlines()[0]}",
                "input_shape": list(shape)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    res = check_model(model, shape)
    return {**res, "input_shape": list(shape), "params": sum(p.numel() for p in model.parameters())}


def _timm_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Converter coverage: timm models",
        "",
        f"`to_graph(model, input_shape)` -> `from_graph(graph, template)` on {len(rows)} timm {env['timm']} models "
        f"(torch {env['torch']}): `timm.create_model(NAME, pretrained=False, num_classes=10)`, 64 px (ViTs / ResMLP "
        "32 px via `img_size`), BatchNorm statistics randomised, CPU. `exact`: every tensor `torch.equal` on a "
        "NaN-filled template and the same outputs (`torch.equal`); `refused`: one `GraphError` naming the module; "
        "`failed`: any other exception or a difference.",
        "",
        _counts_line(rows, env),
        "",
        *_builder_table(rows, "model"),
    ]
    return "\n".join(lines) + "\n"


def _counts_line(rows: list[dict], env: dict) -> str:
    counts = Counter(r["status"] for r in rows)
    return (f"**{counts['exact']} exact, {counts['refused']} refused, {counts['failed']} failed** "
            f"({env['seconds']:.0f} s, `{env['command']}`)")


def _builder_table(rows: list[dict], label: str) -> list[str]:
    """One row per builder / model: input size, parameters, result (marked when run at reduced depth), detail."""
    lines = [f"| {label} | input | params (M) | result | detail |", "|---|---|---|---|---|"]
    for r in rows:
        shape = "x".join(map(str, r.get("input_shape", [])[2:]))
        detail = r["detail"].replace("|", "\\|")
        status = f"{r['status']} (reduced)" if r.get("reduced") else r["status"]
        lines.append(f"| {r['builder']} | {shape} | {r.get('params', 0) / 1e6:.1f} | {status} | {detail} |")
    return lines


def _family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789")


def _markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Converter coverage: torchvision classification builders",
        "",
        f"`to_graph(model, input_shape)` -> `from_graph(graph, template)` on all {len(rows)} builders of "
        f"torchvision {env['torchvision']} (torch {env['torch']}), num_classes=10, CPU. `exact`: every tensor "
        "`torch.equal` and the same outputs; `refused`: one `GraphError` naming the module; `failed`: any other "
        "exception or a difference. Builders over 150 M parameters ran with their repeated blocks cut to two per "
        "stage (same widths and layer types): their graphs would not fit this machine's memory.",
        "",
        _counts_line(rows, env),
        "",
        "| family | builders | exact | refused (reason) |",
        "|---|---|---|---|",
    ]
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(_family(r["builder"]), []).append(r)
    for fam, rs in fams.items():
        ex = sum(r["status"] == "exact" for r in rs)
        red = sum(bool(r.get("reduced")) and r["status"] == "exact" for r in rs)
        other = [r for r in rs if r["status"] != "exact"]
        reasons = sorted({f"{r['status']}: {r['short']}" for r in other})
        lines.append(f"| {fam} | {len(rs)} | {ex}{f' ({red} at reduced depth)' if red else ''} | "
                     f"{'; '.join(reasons) if reasons else ''} |")
    lines += ["", *_builder_table(rows, "builder")]
    return "\n".join(lines) + "\n"


def _short(r: dict) -> str:
    d = r["detail"]
    if "shifted_window_attention" in d or "cpb_mlp" in d:
        return "shifted-window attention (functional, relative position bias)"
    if "split over several dims" in d:
        return "attention that splits channels into heads outside nn.MultiheadAttention"
    return d[:120]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="builders to run (default: all)")
    ap.add_argument("--max-params", type=float, default=150e6,
                    help="cut the repeated blocks of larger builders to two per stage (a graph needs ~36 bytes "
                         "per weight)")
    ap.add_argument("--timm", action="store_true", help="the timm list (TIMM_MODELS) instead of torchvision")
    ap.add_argument("-o", "--output", default=None,
                    help="output stem (default results/convert_coverage, with --timm results/convert_coverage_timm)")
    a = ap.parse_args()
    if a.timm:
        _main_timm(a)
        return
    a.output = a.output or "results/convert_coverage"

    import torch
    import torchvision

    from metaprune.graph import clear_cache
    from metaprune.graph.coverage import check_builder, list_builders, num_params
    from metaprune.io import write_json

    torch.set_num_threads(1)
    names = a.only or list_builders()
    rows = []
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        n = num_params(name)
        r = check_builder(name, reduce=n > a.max_params)
        if r.get("reduced"):
            r["detail"] = (f"{r['detail']} (reduced depth: {n / 1e6:.0f} M parameters > --max-params "
                           f"{a.max_params / 1e6:.0f} M, so {r['reduced']} repeated blocks were cut, 2 per stage kept)")
        r = {"builder": name, **r, "seconds": round(time.perf_counter() - t, 2)}
        r["short"] = _short(r)
        rows.append(r)
        print(f"{name:22s} {r['status']:8s} {r['seconds']:6.1f}s  {r['detail'][:150]}", flush=True)
        clear_cache()
        gc.collect()
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "threads": 1, "seconds": round(time.perf_counter() - t0, 1),
           "command": "OMP_NUM_THREADS=1 .venv/bin/python tools/convert_coverage.py" + (
               f" --only {' '.join(a.only)}" if a.only else "") + (
               f" --max-params {a.max_params:g}" if a.max_params != 150e6 else "")}
    counts = Counter(r["status"] for r in rows)
    out = Path(a.output)
    write_json(out.with_suffix(".json"), {"env": env, "counts": dict(counts), "results": rows})
    out.with_suffix(".md").write_text(_markdown(rows, env))
    print(f"{counts['exact']} exact, {counts['refused']} refused, {counts['failed']} failed; wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _main_timm(a: argparse.Namespace) -> None:
    import timm
    import torch

    from metaprune.graph import clear_cache
    from metaprune.io import write_json

    torch.set_num_threads(1)
    rows = []
    t0 = time.perf_counter()
    for name in a.only or TIMM_MODELS:
        t = time.perf_counter()
        r = {"builder": name, **check_timm(name), "seconds": round(time.perf_counter() - t, 2)}
        rows.append(r)
        print(f"{name:24s} {r['status']:8s} {r['seconds']:6.1f}s  {r['detail'][:150]}", flush=True)
        clear_cache()
        gc.collect()
    env = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(), "threads": 1,
           "seconds": round(time.perf_counter() - t0, 1),
           "command": "OMP_NUM_THREADS=1 .venv/bin/python tools/convert_coverage.py --timm" + (
               f" --only {' '.join(a.only)}" if a.only else "")}
    counts = Counter(r["status"] for r in rows)
    out = Path(a.output or "results/convert_coverage_timm")
    write_json(out.with_suffix(".json"), {"env": env, "counts": dict(counts), "results": rows})
    out.with_suffix(".md").write_text(_timm_markdown(rows, env))
    print(f"{counts['exact']} exact, {counts['refused']} refused, {counts['failed']} failed; wrote "
          f"{out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
