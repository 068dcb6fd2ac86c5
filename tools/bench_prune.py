"""Benchmark: MAC speed-up against measured latency speed-up of structured pruning.

Prunes ``cifar_resnet56`` (and any ``--arch``) to a MAC speed-up target (random init: latency does not
depend on the weights) once per ``--round-to`` setting (default ``auto``, the default of ``metaprune prune``,
and ``1``, exact widths), and times base and pruned models together with
:func:`metaprune.engine.measure.compare_latency` (interleaved rounds, order alternating, threads fixed;
each round keeps the fastest of ``--repeats`` runs, so load from other processes hits both alike and
only ever adds time). The reported speed-up is the median over rounds of the per-round ratio
base / pruned, and ``latency_per_mac`` is that speed-up divided by the MAC speed-up. With ``--onnx`` the
pruned and the base model are also exported to ONNX and timed in onnxruntime in the same rounds
(:func:`metaprune.export.export_latency`). Writes ``--output`` (JSON) and, with ``--markdown``, a table.

    .venv/bin/python tools/bench_prune.py --speedup 2.5 --round-to auto --round-to 1 --threads 1 --threads 2 \\
        --onnx -o results/round_to_auto.json --markdown results/round_to_auto.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from metaprune.engine import count_macs, count_params
from metaprune.engine.measure import compare_latency
from metaprune.engine.report import environment
from metaprune.errors import MetapruneError
from metaprune.io import write_json
from metaprune.models import create_model
from metaprune.pruning import PruneConfig, prune
from metaprune.pruning.rounding import parse_round_to


def bench(arch: str, shape: tuple[int, int, int], speedup: float, batches: tuple[int, ...], rounds: int,
          repeats: int, device: str, criterion: str, round_to="auto", global_pruning: bool = False,
          threads: tuple[int, ...] = (1,), onnx: bool = False) -> dict:
    torch.manual_seed(0)
    base = create_model(arch, num_classes=10, in_chans=shape[0]).eval().to(device)
    t0 = time.perf_counter()
    res = prune(base, PruneConfig(speedup=speedup, criterion=criterion, round_to=round_to,
                                  global_pruning=global_pruning), input_shape=shape)
    prune_s = time.perf_counter() - t0
    pruned = res.model.eval().to(device)
    out = {"arch": arch, "input_shape": list(shape), "target_speedup": speedup, "criterion": criterion,
           "round_to": round_to, "round_to_resolved": res.info.get("round_to"), "global_pruning": global_pruning,
           "widths": [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)],
           "channel_ratio": res.ratio, "target_met": res.target_met, "prune_seconds": prune_s,
           "search_trials": len(res.trials),
           "macs_base": count_macs(base, shape), "macs_pruned": count_macs(pruned, shape),
           "params_base": count_params(base), "params_pruned": count_params(pruned), "latency": {}}
    mac = out["mac_speedup"] = out["macs_base"] / out["macs_pruned"]
    out["params_reduction"] = out["params_base"] / out["params_pruned"]
    print(f"{arch} round_to={round_to} -> {res.info.get('round_to', {}).get('multiple')}: MACs {mac:.3f}x "
          f"(target {speedup}x, met {res.target_met}), {len(res.trials)} trials, {prune_s:.1f} s", flush=True)
    for th in threads:
        for b in batches:
            r = compare_latency({"base": base, "pruned": pruned}, shape, b, device, rounds=rounds, repeats=repeats,
                                threads=th)
            sp = r["ratios"]["pruned"]
            out["latency"][f"t{th}_b{b}"] = {
                "threads": th, "batch": b, "base_ms": r["models"]["base"]["ms"], "pruned_ms": r["models"]["pruned"]["ms"],
                "speedup": sp, "latency_per_mac": sp / mac,
                "round_speedups": [x / y for x, y in zip(r["models"]["base"]["ms_rounds"],
                                                         r["models"]["pruned"]["ms_rounds"])],
                "rounds": rounds, "repeats_per_round": repeats, "device": device, "dtype": "float32"}
            print(f"  pytorch threads {th} batch {b}: base {r['models']['base']['ms']:.2f} ms, pruned "
                  f"{r['models']['pruned']['ms']:.2f} ms -> {sp:.2f}x = {sp / mac:.2f} of MACs", flush=True)
    if onnx:
        from metaprune.export import export_latency, export_model

        out["onnxruntime"] = {}
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "pruned.onnx"
            rep = export_model(pruned.cpu(), path, "onnx", shape)
            for th in threads:
                lat = export_latency(pruned, path, "onnx", shape, baseline=base, batches=batches, threads=th,
                                     rounds=rounds, repeats=repeats, device=device)
                for b, e in lat["batches"].items():
                    sp = e["speedup"]["onnxruntime"]
                    out["onnxruntime"][f"t{th}_b{b}"] = {
                        "threads": th, "batch": int(b), "base_ms": e["ms"]["onnxruntime_baseline"],
                        "pruned_ms": e["ms"]["onnxruntime"], "speedup": sp, "latency_per_mac": sp / mac,
                        "pytorch_speedup_same_rounds": e["speedup"]["pytorch"],
                        "max_abs_diff": rep["max_abs_diff"], "rounds": rounds, "repeats_per_round": repeats}
                    print(f"  onnxruntime threads {th} batch {b}: base {e['ms']['onnxruntime_baseline']:.2f} ms, "
                          f"pruned {e['ms']['onnxruntime']:.2f} ms -> {sp:.2f}x = {sp / mac:.2f} of MACs "
                          f"(pytorch in the same rounds {e['speedup']['pytorch']:.2f}x)", flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`", "",
             "| arch | round_to | multiple | MAC speed-up | runtime | threads | batch | base ms | pruned ms | "
             "latency speed-up | latency / MAC |", "|" + "---|" * 11]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['round_to']} | - | - | error: {r['error']} | | | | | | |")
            continue
        mult = (r.get("round_to_resolved") or {}).get("multiple")
        for rt, entries in (("pytorch", r["latency"]), ("onnxruntime", r.get("onnxruntime", {}))):
            for e in entries.values():
                lines.append(f"| {r['arch']} | {r['round_to']} | {mult} | {r['mac_speedup']:.3f} | {rt} | "
                             f"{e['threads']} | {e['batch']} | {e['base_ms']:.2f} | {e['pruned_ms']:.2f} | "
                             f"{e['speedup']:.2f} | {e['latency_per_mac']:.2f} |")
    lines += ["", "Latency speed-up: median over interleaved rounds of base ms / pruned ms (each round: fastest of "
              "the repeats); latency / MAC: that speed-up divided by the MAC speed-up (target >= 0.85 at batch 64)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", default=None, help="architectures (default cifar_resnet56)")
    ap.add_argument("--shape", default="3,32,32", help="C,H,W of the input")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--criterion", default=PruneConfig.criterion, help="default: prune's default")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--round-to", action="append", type=parse_round_to, default=None,
                    help="'auto' or N, repeatable (default: auto)")
    ap.add_argument("--global", dest="global_pruning", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", action="append", type=int, default=None, help="fixed thread counts (default 1)")
    ap.add_argument("--onnx", action="store_true", help="also time onnxruntime (needs the onnx extra)")
    ap.add_argument("-o", "--output", default="results/bench_prune.json")
    ap.add_argument("--markdown", help="also write a markdown table here")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    batches = tuple(int(v) for v in a.batches.split(","))
    runs = []
    for arch in a.arch or ["cifar_resnet56"]:
        for rt in a.round_to or ["auto"]:
            try:
                runs.append(bench(arch, shape, a.speedup, batches, a.rounds, a.repeats, a.device, a.criterion, rt,
                                  a.global_pruning, tuple(a.threads or [1]), a.onnx))
            except MetapruneError as e:  # e.g. an explicit --round-to that cannot reach the target: recorded
                print(f"{arch} round_to={rt}: {e}", flush=True)
                runs.append({"arch": arch, "round_to": rt, "error": str(e), "latency": {}})
    result = {"command": "python " + " ".join(sys.argv), "runs": runs, "environment": environment(),
              "method": "compare_latency: interleaved rounds base/pruned, alternating order, threads fixed; each "
                        "round = fastest of repeats; speed-up = median over rounds of the per-round ratio"}
    write_json(a.output, result)
    if a.markdown:
        Path(a.markdown).write_text(markdown(result))
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
