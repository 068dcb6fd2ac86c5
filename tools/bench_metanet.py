"""Speed and memory of one metanetwork forward+backward on a real network graph.

    .venv/bin/python tools/bench_metanet.py --arch cifar_resnet56 --hidden 64 --layers 8 --threads 2 \
        -o results/metanet_bench.json

Each configuration runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own;
``metanet_increment_mb`` is that peak minus the peak after importing torch and building the graph.
``--edge-chunk`` recomputes every chunk in the backward pass (``--checkpoint`` is per layer and only
matters without chunks). The machine's load average is recorded with every number (the CPU may be
shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from metaprune.graph import to_graph
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet
    from metaprune.models import create_model

    model = create_model(args.arch, num_classes=10, in_chans=3)
    g = to_graph(model)
    rss_graph = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net = Metanet.for_graph(g, MetanetConfig(hidden=args.hidden, layers=args.layers, edit="residual", edge_chunk=args.edge_chunk,
                                             checkpoint=args.checkpoint))
    times, cpu = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        c0 = time.process_time()
        x, ea = net(g)
        loss = x.square().mean() + sum(v.square().mean() for v in ea.values())
        loss.backward()
        net.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"arch": args.arch, "nodes": g.num_nodes, "edges": g.num_edges, "hidden": args.hidden,
            "layers": args.layers, "edge_chunk": args.edge_chunk, "checkpoint": args.checkpoint,
            "threads": args.threads, "params": sum(p.numel() for p in net.parameters()),
            "fwd_bwd_s": times, "fwd_bwd_s_min": min(times), "cpu_s": cpu,
            "peak_rss_mb": (peak := resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_graph_mb": rss_graph, "metanet_increment_mb": peak - rss_graph, "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="cifar_resnet56")
    p.add_argument("--hidden", type=int, nargs="+", default=[64])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--edge-chunk", type=int)
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--variant-chunk", type=int, default=25000, help="edge chunk of the --variants chunked run")
    p.add_argument("--variants", action="store_true", help="also run checkpointing and edge chunking")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", help="JSON file (appended runs are merged by configuration)")
    a = p.parse_args()
    if a.child:
        a.hidden = a.hidden[0]
        print(json.dumps(_child(a)))
        return
    runs = []
    variants = [(None, False)] + ([(None, True), (a.variant_chunk, False)] if a.variants else [])
    if a.edge_chunk or a.checkpoint:
        variants = [(a.edge_chunk, a.checkpoint)]
    for h in a.hidden:
        for chunk, ck in variants:
            cmd = [sys.executable, __file__, "--child", "--arch", a.arch, "--hidden", str(h), "--layers", str(a.layers),
                   "--threads", str(a.threads), "--repeats", str(a.repeats)]
            cmd += (["--edge-chunk", str(chunk)] if chunk else []) + (["--checkpoint"] if ck else [])
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                runs.append({"hidden": h, "edge_chunk": chunk, "checkpoint": ck, "error": r.stderr[-500:]})
            else:
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    if a.output:
        sys.path.insert(0, str(ROOT))
        from metaprune.io import write_json

        write_json(a.output, {"runs": runs})


if __name__ == "__main__":
    main()
