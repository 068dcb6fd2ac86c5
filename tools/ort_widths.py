"""Why onnxruntime gains less than the MAC cut: pruned widths against onnxruntime's blocked (NCHWc) kernels.

For ResNet-56 (random init: latency does not depend on the weights) pruned to ``--speedup`` with several
width rules, this records, per model:

* MACs and the *block-padded* MACs: onnxruntime's CPU provider runs a convolution with MLAS's NCHWc
  kernels, whose channel block is 16 with AVX-512 (8 with AVX2); an output width is padded up to a
  multiple of the block and an input width of at least one block must be a multiple of it (a narrower
  input is read in plain NCHW, behind a ReorderOutput node). ``padded_speedup`` is the MAC speed-up
  counted on those padded widths: the speed-up the blocked kernels can deliver at best;
* onnxruntime's own optimised graph (``SessionOptions.optimized_model_filepath``): how many convolutions
  run blocked (``com.microsoft.nchwc`` domain), how many ReorderInput/ReorderOutput nodes it inserted,
  how many BatchNormalization / Add / Relu nodes are left (folded and fused: none), and the weight
  elements onnxruntime holds against PyTorch's (> 1: padded channels);
* onnxruntime's per-operator profile (``SessionOptions.enable_profiling``) at the largest batch: time per
  operator type;
* PyTorch and onnxruntime latency of all models measured in the same interleaved rounds
  (``metaprune.engine.measure.compare_latency``, threads fixed, the same session options for every
  model: ``metaprune.export.OrtModule``, ORT_ENABLE_ALL), with the spread of the per-round ratios, and
  onnxruntime with ORT_ENABLE_EXTENDED (no NCHWc transformer) for comparison.

Width rules: ``auto`` (the default of ``metaprune prune``: multiples of 8 on AVX-512), ``block``
(``--round-to block``: the CPU's convolution block, 16 on AVX-512, with the block rule of
``metaprune.pruning.rounding``), ``exact`` (``--round-to 1``) and ``block-global`` (``--round-to block
--global``).

    .venv/bin/python tools/ort_widths.py --speedup 2.5 --batches 64,1 --rounds 9 --repeats 2 \\
        -o results/round_to_auto.ort.json --markdown results/round_to_auto.ort.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from metaprune.engine.measure import compare_latency, count_macs
from metaprune.engine.report import environment
from metaprune.export import OrtModule, export_model, require_onnx
from metaprune.io import write_json
from metaprune.models import create_model
from metaprune.pruning import PruneConfig, prune

RULES = ("auto", "block", "exact", "block-global")


def nchwc_block() -> int:
    """MLAS's NCHWc channel block on this CPU: 16 with AVX-512F, 8 with AVX2 (else no blocked kernels: 1)."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    words = set(flags.split())
    return 16 if "avx512f" in words else 8 if "avx2" in words else 1


def build(rule: str, base: nn.Module, shape, speedup: float, block: int) -> tuple[nn.Module, dict]:
    if rule == "auto":
        res = prune(base, PruneConfig(speedup=speedup), input_shape=shape)
    elif rule == "exact":
        res = prune(base, PruneConfig(speedup=speedup, round_to=1), input_shape=shape)
    elif rule == "block":
        res = prune(base, PruneConfig(speedup=speedup, round_to="block"), input_shape=shape)
    elif rule == "block-global":
        res = prune(base, PruneConfig(speedup=speedup, round_to="block", global_pruning=True), input_shape=shape)
    else:
        raise SystemExit(f"unknown rule {rule}; choose from {RULES}")
    return res.model.eval(), {"round_to": res.info.get("round_to"), "target_met": res.target_met}


def conv_macs(model: nn.Module, shape, block: int) -> dict[str, list[int]]:
    """``{stage: [MACs of its convolutions, the same with NCHWc-padded widths]}`` (stage: ``layerN`` from
    the module name, else ``stem/head``) and ``"all"``."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def pad_out(c: int) -> int:
        return math.ceil(c / block) * block

    def pad_in(c: int) -> int:
        return c if c < block else pad_out(c)

    def hook_for(name):
        stage = re.match(r"layer\d+", name)
        key = stage.group(0) if stage else "stem/head"

        def hook(m, _, o):
            k = m.kernel_size[0] * m.kernel_size[1] * o.shape[2] * o.shape[3]
            for s in (key, "all"):
                out[s][0] += m.in_channels // m.groups * m.out_channels * k
                out[s][1] += pad_in(m.in_channels) // m.groups * pad_out(m.out_channels) * k
        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return dict(out)


def optimised_graph(onnx_path: Path, opt_path: Path, model: nn.Module) -> dict:
    """What onnxruntime made of the graph (ORT_ENABLE_ALL, 1 thread)."""
    onnx, ort = require_onnx()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.optimized_model_filepath = str(opt_path)
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    g = onnx.load(str(opt_path)).graph
    ops = collections.Counter(f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in g.node)
    init = {i.name: math.prod(i.dims) for i in g.initializer}
    conv_w = sum(init.get(n.input[1], 0) for n in g.node if n.op_type in ("Conv", "FusedConv") and len(n.input) > 1)
    torch_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return {"ops": dict(sorted(ops.items())), "conv_weight_elements_ort_over_torch": conv_w / torch_w,
            "nchwc_convs": ops.get("com.microsoft.nchwc:Conv", 0),
            "plain_convs": ops.get("Conv", 0) + ops.get("com.microsoft:FusedConv", 0),
            "reorders": sum(v for k, v in ops.items() if "Reorder" in k),
            "batchnorm_add_relu_left": sum(ops.get(k, 0) for k in ("BatchNormalization", "Add", "Relu"))}


def op_profile(onnx_path: Path, batch: int, shape, runs: int, folder: Path) -> dict:
    """onnxruntime's per-operator profile: total microseconds per op type over ``runs`` runs."""
    _, ort = require_onnx()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.enable_profiling = True
    so.profile_file_prefix = str(folder / f"{onnx_path.stem}_b{batch}")
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *shape).numpy()
    name = s.get_inputs()[0].name
    for _ in range(3 + runs):
        s.run(None, {name: x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    per_stage: dict[str, float] = collections.defaultdict(float)
    seen = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            seen[e["name"]] += 1
            if seen[e["name"]] > 3:  # skip the warm-up runs
                per_op[e["args"]["op_name"]] += e["dur"]
                stage = re.search(r"layer\d+", e["name"])
                per_stage[stage.group(0) if stage else "other"] += e["dur"]
    total = sum(per_op.values())
    return {"us_per_run": {k: v / runs for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "us_per_run_by_stage": {k: v / runs for k, v in sorted(per_stage.items())},
            "total_us_per_run": total / runs, "runs": runs, "batch": batch}


def ort_module(path: Path, level: str) -> OrtModule:
    _, ort = require_onnx()
    m = OrtModule(path, threads=1)
    if level != "all":
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        m.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_resnet56")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("-o", "--output", default="results/round_to_auto.ort.json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    torch.set_num_threads(1)
    shape = (3, 32, 32)
    block = nchwc_block()
    batches = tuple(int(v) for v in a.batches.split(","))
    torch.manual_seed(0)
    base = create_model(a.arch, num_classes=10, in_chans=3).eval()
    models = {"base": (base, {})}
    for rule in a.rules.split(","):
        models[rule] = build(rule, base, shape, a.speedup, block)
        print(f"{rule}: {models[rule][1]}", flush=True)
    out = {"command": "python " + " ".join(sys.argv), "arch": a.arch, "target_speedup": a.speedup,
           "nchwc_block": block, "environment": environment("cpu"), "models": {}, "latency": {}}
    timed = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        macs0, st0 = count_macs(base, shape), conv_macs(base, shape, block)
        for name, (m, info) in models.items():
            path = d / f"{name}.onnx"
            rep = export_model(m, path, "onnx", shape)
            macs = count_macs(m, shape)
            st = conv_macs(m, shape, block)
            out["models"][name] = {
                **info, "macs": macs, "mac_speedup": macs0 / macs, "padded_conv_macs": st["all"][1],
                "padded_speedup": st0["all"][1] / st["all"][1], "max_abs_diff": rep["max_abs_diff"],
                "stage_macs": {k: {"macs": v[0], "padded": v[1], "speedup": st0[k][0] / v[0],
                                   "padded_speedup": st0[k][1] / v[1]} for k, v in st.items() if k != "all"},
                "widths": dict(sorted(collections.Counter(x.out_channels for x in m.modules()
                                                          if isinstance(x, nn.Conv2d)).items())),
                "ort_graph": optimised_graph(path, d / f"{name}.opt.onnx", m),
                "ort_profile": op_profile(path, max(batches), shape, a.profile_runs, d)}
            print(name, {k: v for k, v in out["models"][name].items() if k != "ort_profile"}, flush=True)
            timed[f"{name}|pytorch"] = m
            timed[f"{name}|onnxruntime"] = ort_module(path, "all")
            timed[f"{name}|onnxruntime-extended"] = ort_module(path, "extended")
        for b in batches:
            r = compare_latency(timed, shape, b, "cpu", rounds=a.rounds, repeats=a.repeats, threads=1)
            rows = {}
            for key, v in r["models"].items():
                name, runtime = key.split("|")
                ref = r["models"][f"base|{runtime}"]["ms_rounds"]
                per_round = [x / y for x, y in zip(ref, v["ms_rounds"])]
                sp = sorted(per_round)[len(per_round) // 2] if len(per_round) % 2 else \
                    sum(sorted(per_round)[len(per_round) // 2 - 1:len(per_round) // 2 + 1]) / 2
                rows[key] = {"name": name, "runtime": runtime, "ms": v["ms"], "ms_rounds": v["ms_rounds"],
                             "speedup": sp, "speedup_min": min(per_round), "speedup_max": max(per_round),
                             "latency_per_mac": sp / out["models"][name]["mac_speedup"]}
                print(f"b{b} {key}: {v['ms']:.2f} ms, {sp:.2f}x ({min(per_round):.2f}-{max(per_round):.2f}) = "
                      f"{rows[key]['latency_per_mac']:.2f} of MACs", flush=True)
            out["latency"][str(b)] = {"rounds": a.rounds, "repeats_per_round": a.repeats, "threads": 1,
                                      "rows": rows}
    write_json(a.output, out)
    if a.markdown:
        Path(a.markdown).write_text(markdown(out))
    print(f"wrote {a.output}")


def markdown(out: dict) -> str:
    lines = [f"Command: `{out['command']}`", "",
             f"NCHWc channel block of onnxruntime's MLAS kernels on this CPU: {out['nchwc_block']}.", "",
             "| model | widths (out channels: convs) | MAC speed-up | block-padded speed-up | ORT blocked convs | "
             "ORT plain convs | ORT reorder nodes | BN/Add/Relu left | ORT conv weights / PyTorch's |",
             "|" + "---|" * 9]
    for name, m in out["models"].items():
        g = m["ort_graph"]
        w = ", ".join(f"{k}: {v}" for k, v in m["widths"].items())
        lines.append(f"| {name} | {w} | {m['mac_speedup']:.3f} | {m['padded_speedup']:.3f} | {g['nchwc_convs']} | "
                     f"{g['plain_convs']} | {g['reorders']} | {g['batchnorm_add_relu_left']} | "
                     f"{g['conv_weight_elements_ort_over_torch']:.3f} |")
    lines += ["", "Latency (CPU, 1 thread, all models in the same interleaved rounds; speed-up = median of the "
              "per-round ratios base / model in the same runtime, [min-max] over rounds):", "",
              "| batch | model | runtime | ms | speed-up | [min-max] | latency / MAC |", "|" + "---|" * 7]
    for b, lat in out["latency"].items():
        for r in lat["rows"].values():
            lines.append(f"| {b} | {r['name']} | {r['runtime']} | {r['ms']:.2f} | {r['speedup']:.2f} | "
                         f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | {r['latency_per_mac']:.2f} |")
    b = max(out["latency"], key=int) if out["latency"] else "64"
    lines += ["", f"onnxruntime per-operator profile (ORT_ENABLE_ALL, 1 thread, batch {b}, µs per run):", "",
              "| model | total | " + " | ".join(["op 1", "op 2", "op 3", "op 4"]) + " |", "|" + "---|" * 6]
    for name, m in out["models"].items():
        p = m["ort_profile"]
        top = list(p["us_per_run"].items())[:4]
        cells = [f"{k} {v:,.0f} ({v / p['total_us_per_run']:.0%})" for k, v in top] + [""] * (4 - len(top))
        lines.append(f"| {name} | {p['total_us_per_run']:,.0f} | " + " | ".join(cells) + " |")
    stages = sorted({k for m in out["models"].values() for k in m["ort_profile"]["us_per_run_by_stage"]})
    lines += ["", "The same profile by network stage (µs per run; speed-up vs base in brackets), next to the stage's "
              "MAC speed-up and block-padded MAC speed-up; `other`: the stem conv, the head and the ReorderOutput "
              "nodes onnxruntime inserted (their names carry no stage):", "",
              "| model | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 1)]
    base = out["models"]["base"]["ort_profile"]["us_per_run_by_stage"]
    for name, m in out["models"].items():
        p = m["ort_profile"]["us_per_run_by_stage"]
        st = m.get("stage_macs", {})
        cells = []
        for k in stages:
            c = f"{p.get(k, 0):,.0f} ({base.get(k, 0) / p[k]:.2f}x)" if p.get(k) else "-"
            if k in st and k != "other":
                c += f"; MACs {st[k]['speedup']:.2f}x, padded {st[k]['padded_speedup']:.2f}x"
            cells.append(c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
