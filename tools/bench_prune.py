"""Benchmark: MAC speed-up against measured latency speed-up of structured pruning.

Prunes ``cifar_resnet56`` (and any ``--arch``) to a MAC speed-up target and times base and pruned
models in interleaved rounds (base, pruned, base, pruned, ...) so that load from other processes
hits both alike; each round is a median of ``--repeats`` forward passes after warm-up, and the
reported latency is the median over rounds. Writes ``results/bench_prune.json``.

    .venv/bin/python tools/bench_prune.py --speedup 2.5 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metaprune.engine import count_macs, count_params, measure_latency
from metaprune.engine.report import environment
from metaprune.io import write_json
from metaprune.models import create_model
from metaprune.pruning import PruneConfig, prune


def bench(arch: str, shape: tuple[int, int, int], speedup: float, batches: tuple[int, ...], rounds: int,
          repeats: int, device: str, criterion: str, round_to: int | None = None,
          global_pruning: bool = False) -> dict:
    torch.manual_seed(0)
    base = create_model(arch, num_classes=10, in_chans=shape[0]).eval().to(device)
    t0 = time.perf_counter()
    res = prune(base, PruneConfig(speedup=speedup, criterion=criterion, round_to=round_to,
                                          global_pruning=global_pruning), input_shape=shape)
    prune_s = time.perf_counter() - t0
    pruned = res.model.eval().to(device)
    out = {"arch": arch, "input_shape": list(shape), "target_speedup": speedup, "criterion": criterion, "round_to": round_to,
           "global_pruning": global_pruning, "widths": [m.out_channels for m in pruned.modules()
                                                        if isinstance(m, torch.nn.Conv2d)],
           "channel_ratio": res.ratio, "prune_seconds": prune_s, "search_trials": len(res.trials),
           "macs_base": count_macs(base, shape), "macs_pruned": count_macs(pruned, shape),
           "params_base": count_params(base), "params_pruned": count_params(pruned), "latency": {}}
    out["mac_speedup"] = out["macs_base"] / out["macs_pruned"]
    out["params_reduction"] = out["params_base"] / out["params_pruned"]
    for b in batches:
        tb, tp_ = [], []
        for _ in range(rounds):
            tb.append(measure_latency(base, shape, b, device, warmup=2, repeats=repeats)["ms"])
            tp_.append(measure_latency(pruned, shape, b, device, warmup=2, repeats=repeats)["ms"])
        per_round = [x / y for x, y in zip(tb, tp_)]
        out["latency"][str(b)] = {"base_ms": statistics.median(tb), "pruned_ms": statistics.median(tp_),
                                  "speedup_of_medians": statistics.median(tb) / statistics.median(tp_),
                                  "median_round_speedup": statistics.median(per_round),
                                  "round_speedups": per_round, "rounds": rounds, "repeats_per_round": repeats,
                                  "device": device, "dtype": "float32", "threads": torch.get_num_threads()}
        print(f"{arch} {shape} batch {b}: base {statistics.median(tb):.2f} ms, pruned {statistics.median(tp_):.2f} "
              f"ms -> {out['latency'][str(b)]['speedup_of_medians']:.2f}x (MACs {out['mac_speedup']:.2f}x)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", default=None, help="architectures (default cifar_resnet56)")
    ap.add_argument("--shape", default="3,32,32", help="C,H,W of the input")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--criterion", default="l2")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--round-to", type=int, default=None)
    ap.add_argument("--global", dest="global_pruning", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("-o", "--output", default="results/bench_prune.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(","))
    batches = tuple(int(v) for v in a.batches.split(","))
    runs = [bench(arch, shape, a.speedup, batches, a.rounds, a.repeats, a.device, a.criterion,
                  a.round_to, a.global_pruning)
            for arch in (a.arch or ["cifar_resnet56"])]
    write_json(a.output, {"runs": runs, "environment": environment(),
                          "method": "interleaved rounds base/pruned; each round = median of repeats after "
                                    "warm-up; reported = median over rounds"})
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
