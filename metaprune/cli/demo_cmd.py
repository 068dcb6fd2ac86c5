"""``metaprune demo``: the whole pipeline on the shipped checkpoints."""

from __future__ import annotations

import argparse

from metaprune.cli.common import DEFAULT_METANET, DEFAULT_RANK_METANET, add_common, guard, model_path, status


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the shipped checkpoints and Fashion-MNIST",
                       description="convert -> transform -> curves -> L2 vs gate vs ranking metanetwork -> prune 2x/3x -> finetune -> adapt 2 tasks -> "
                       "merge; prints one table and writes everything under -o.")
    p.add_argument("model", nargs="?", help="source model (default: the shipped checkpoint)")
    p.add_argument("--metanet", help="edit metanetwork folder (default: the shipped one)")
    p.add_argument("--rank-metanet", help="ranking metanetwork folder compared with L2 and gate (default: the shipped "
                   "one; 'none' leaves that arm out)")
    p.add_argument("--data", default="fashion-mnist", help="dataset (falls back to synthetic when missing)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--task", action="append", help="adapter task (repeatable; default fmnist-tops, fmnist-groups)")
    p.add_argument("--fast", action="store_true", help="a few steps per stage (about 2 minutes on 2 cores)")
    p.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")
    add_common(p)
    p.set_defaults(func=cmd_demo)


def _check_tasks(tasks) -> None:
    """Unknown task names fail now, not after the first stages have run (and written)."""
    from pathlib import Path

    from metaprune.data import get_task
    from metaprune.data.datasets import DATASETS
    from metaprune.errors import DataError

    for t in tasks:
        if t.startswith("imagefolder:"):
            if not Path(t.split(":", 1)[1]).is_dir():
                raise DataError(f"--task {t}: image folder {t.split(':', 1)[1]} does not exist")
        elif t not in DATASETS:
            get_task(t)


def cmd_demo(args: argparse.Namespace) -> int:
    from metaprune.demo import DEFAULT_TASKS, DemoConfig, format_summary, run_demo
    from metaprune.metanet.checkpoint import load_metanet

    src = model_path(args)
    mdir = args.metanet or str(DEFAULT_METANET)
    guard(args, [src, mdir], folders=[args.output])
    _check_tasks(args.task or DEFAULT_TASKS)
    load_metanet(mdir)  # a missing or damaged metanetwork fails before any work
    rank = args.rank_metanet or (str(DEFAULT_RANK_METANET) if DEFAULT_RANK_METANET.exists() else "")
    if rank == "none":
        rank = ""
    if rank:
        from metaprune.metanet.rank import load_score_metanet

        guard(args, [rank])
        load_score_metanet(rank)
    cfg = DemoConfig(source=src, metanet=mdir, rank_metanet=rank, output=args.output,
                     data=args.data, data_dir=args.data_dir, tasks=tuple(args.task or DEFAULT_TASKS), fast=args.fast,
                     device=args.device, seed=args.seed)
    report = run_demo(cfg, say=lambda m: status(args, m))
    print(format_summary(report))
    status(args, f"outputs and report.json in {args.output}/")
    return 0
