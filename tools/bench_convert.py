"""Benchmark model <-> graph conversion: nodes, edges, to_graph / from_graph time, peak memory.

Each architecture runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its
own. ``to_graph`` is timed cold (first call: fx trace + structure) and warm (structure cached, only
the weights are copied); ``from_graph`` rebuilds the module and copies every tensor. Prints a table
and writes results/bench_convert.json.

    .venv/bin/python tools/bench_convert.py [--archs resnet50 vit_b_16 ...] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = ["cifar_resnet56", "cifar_vgg19_bn", "resnet50", "vit_tiny_p4", "vit_b_16"]


def run_one(arch: str, threads: int, repeat: int) -> dict:
    """Measure one architecture in this process."""
    import torch

    from metaprune.graph import clear_cache, from_graph, to_graph
    from metaprune.models import create_model

    torch.set_num_threads(threads)
    model = create_model(arch, num_classes=1000 if arch in ("resnet50", "vit_b_16") else 10).eval()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cold, warm, back = [], [], []
    for _ in range(repeat):
        clear_cache()
        t = time.perf_counter()
        g = to_graph(model)
        cold.append(time.perf_counter() - t)
        del g
        t = time.perf_counter()
        g = to_graph(model)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        m2 = from_graph(g)
        back.append(time.perf_counter() - t)
        exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
        del m2
    d = g.describe()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"arch": arch, "nodes": d["nodes"], "edges": d["edges"],
            "edge_groups": {k: v["edges"] for k, v in d["edge_groups"].items()},
            "to_graph_cold_s": min(cold), "to_graph_warm_s": min(warm), "from_graph_s": min(back),
            "round_trip_cold_s": min(cold) + min(back), "round_trip_warm_s": min(warm) + min(back),
            "exact": exact, "model_mb": base_rss / 1024, "peak_mb": peak / 1024, "threads": threads,
            "repeat": repeat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy machine)")
    ap.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("-o", "--output", default="results/bench_convert.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.threads, a.repeat)))
        return 0
    rows = []
    for arch in a.archs:
        r = subprocess.run([sys.executable, __file__, "--one", arch, "--threads", str(a.threads),
                            "--repeat", str(1 if arch == "vit_b_16" else a.repeat)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if r.returncode:
            print(f"{arch}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            rows.append({"arch": arch, "error": r.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    hdr = f"{'architecture':<16}{'nodes':>9}{'edges':>13}{'to_graph s':>12}{'(warm)':>9}{'from_graph s':>14}{'peak MB':>10}  exact"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<16} failed: {r['error']}")
            continue
        print(f"{r['arch']:<16}{r['nodes']:>9,}{r['edges']:>13,}{r['to_graph_cold_s']:>12.3f}{r['to_graph_warm_s']:>9.3f}"
              f"{r['from_graph_s']:>14.3f}{r['peak_mb']:>10,.0f}  {r['exact']}")
    from metaprune.io import write_json

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "torch_threads": a.threads}
    write_json(a.output, {"env": env, "results": rows})
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
