"""SPLoRA bundles vs fine-pruning at several pruning ratios (same schedule, same epochs).

For each ratio, trains one SPLoRA bundle and one fine-pruned model (method ``full``: every weight
trained, the same masks, criterion and iterative schedule) on a task derived from the source's
dataset, then records test accuracy (of the merged dense model), learned parameters (the SPA
paper's counting rule), bundle bytes vs the dense pruned model's bytes, and MACs. Results are
written to JSON after every run (so a killed run keeps what finished).

Sized for a 2-core CPU: a training subset and a few epochs. Example::

    nohup .venv/bin/python tools/bench_spa.py --source /tmp/spa_src/model.safetensors \\
        --task fmnist-tops --train-subset 3000 -o results/spa_bench.json > bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from metaprune.io import write_json
from spa.api import AdaptConfig, adapt_task

KEYS = ("test_acc", "test_acc_masked", "val_acc", "learned_params", "bundle_bytes", "dense_pruned_bytes",
        "bundle_to_dense", "params", "macs", "seconds", "epochs")


def collect(bundles: Path, output: str) -> int:
    """Gather the ``report.json`` of every bundle folder under ``bundles`` into one JSON file."""
    from metaprune.io import read_json

    rows = []
    for rep in sorted(bundles.glob("*/report.json")):
        r = read_json(rep)
        rows.append({"task": r["task"], "bundle": str(rep.parent), "method": r["method"], "rank": r["rank"],
                     "ratio": r["ratio"], "train_subset": r["config"]["train_subset"],
                     "steps": r["config"]["steps"], **{k: r[k] for k in KEYS}})
    write_json(output, {"description": "one source, one bundle per task (metaprune adapt, one command each)",
                        "tasks": rows})
    for r in rows:
        print(f"{r['task']:16s} test {r['test_acc']:.2f}%  learned {r['learned_params']['total']:,}  bundle "
              f"{r['bundle_bytes']:,} B / dense {r['dense_pruned_bytes']:,} B ({100 * r['bundle_to_dense']:.1f}%)  "
              f"MACs {r['macs']['pruned'] / 1e6:.2f} M of {r['macs']['source'] / 1e6:.2f} M")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", help="only gather the report.json of the bundle folders under this folder")
    p.add_argument("--source")
    p.add_argument("--task", default="fmnist-tops")
    p.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    p.add_argument("--methods", default="splora,full")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-adapter", type=float, default=0.05)
    p.add_argument("--lr-full", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", default="results/spa_bench.json")
    a = p.parse_args(argv)
    if a.collect:
        return collect(Path(a.collect), a.output)
    if not a.source:
        p.error("--source is required")
    out = {"description": "SPLoRA vs fine-pruning (method full) with the same masks criterion and schedule",
           "source": a.source, "task": a.task, "args": vars(a), "command": " ".join(sys.argv), "runs": []}
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for method in a.methods.split(","):
            cfg = AdaptConfig(method=method, rank=a.rank, ratio=ratio, steps=a.steps, warmup_epochs=a.warmup_epochs,
                              recovery_epochs=a.recovery_epochs, lr=a.lr_full if method == "full" else a.lr_adapter,
                              train_subset=a.train_subset, seed=a.seed, device=a.device,
                              batch_size=a.batch_size)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as td:
                r = adapt_task(a.source, a.task, Path(td) / "bundle", cfg).report
            run = {"method": method, "ratio": ratio, "lr": cfg.lr, **{k: r[k] for k in KEYS}}
            out["runs"].append(run)
            write_json(a.output, out)
            print(f"{method:7s} ratio {ratio:.1f}: test {r['test_acc']:.2f}%  learned {r['learned_params']['total']:,}  "
                  f"bundle {r['bundle_bytes']:,} B / dense {r['dense_pruned_bytes']:,} B  "
                  f"MACs {r['macs']['pruned'] / 1e6:.2f} M  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
