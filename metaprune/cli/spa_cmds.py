"""``adapt`` and ``merge``: Structured Pruning Adapter bundles (the library is :mod:`spa`)."""

from __future__ import annotations

import argparse

from metaprune.cli.common import (
    add_common,
    add_repeat_channels,
    guard,
    model_output_file,
    model_path,
    output_folder_files,
    print_json,
    status,
)


def _defaults() -> dict:
    """The library's defaults (:class:`spa.api.AdaptConfig`), so ``metaprune adapt`` and the API agree."""
    from dataclasses import MISSING, fields

    from spa.api import AdaptConfig

    return {f.name: f.default for f in fields(AdaptConfig) if f.default is not MISSING}


def register(sub) -> None:
    p = sub.add_parser("adapt", help="train a pruned adapter bundle for a task on a frozen source model",
                       description="Adapt a frozen source model to a task with Structured Pruning Adapters: adapters, "
                       "norms and a new head are trained while channels are pruned iteratively (criterion on the fused "
                       "weights) with recovery epochs; base and adapters are pruned together along torch-pruning's "
                       "dependency groups. Writes OUT/adapter_config.json, OUT/adapter_model.safetensors, OUT/report.json.")
    p.add_argument("source", nargs="?", help="source model file (default: the shipped checkpoint)")
    p.add_argument("--task", required=True, help="registered task (see `metaprune list-models --data`), dataset, "
                   "or imagefolder:PATH")
    d = _defaults()
    p.add_argument("--method", default=d["method"], help="splora, sppara, hydra, lora (unpruned reference) or full "
                   "(fine-pruning baseline)")
    p.add_argument("--rank", type=int, default=d["rank"], help="adapter rank")
    p.add_argument("--ratio", type=float, default=d["ratio"], help="share of channels pruned in every dependency group")
    p.add_argument("--criterion", default=d["criterion"],
                   help="channel ranking at each pruning step: l2 (L2 norm of the fused source+adapter weights "
                   "along the dependency group; default), functional (||(gamma,beta)|| of the group's norm layers x "
                   "||fused input columns of its consumers||, as `prune --criterion functional`), random (seeded "
                   "by --seed and the step) or gate (a ranking optimised on the task's training batches at every "
                   "step, as `prune --criterion gate`; --gate-steps each); prune's other criteria (l1, bn, taylor, "
                   "metanet) are not available here")
    p.add_argument("--gate-steps", type=int, default=d["gate_steps"],
                   help="training steps (batches of --batch-size) of --criterion gate at every pruning step")
    p.add_argument("--steps", type=int, default=d["steps"], help="pruning steps (the ratio rises linearly)")
    p.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"], help="transfer epochs before pruning")
    p.add_argument("--recovery-epochs", type=int, default=d["recovery_epochs"],
                   help="training epochs after each pruning step")
    p.add_argument("--min-steps", type=int, default=d["min_steps"],
                   help="at least this many optimisation steps in every phase (warm-up, each recovery): on a small "
                   "dataset a phase gets more epochs; 0 (or --max-steps-per-epoch, a quick run) runs exactly the "
                   "epochs given")
    p.add_argument("--lr", type=float, default=d["lr"],
                   help="learning rate (default: 0.1 for adapters and the head, 0.01 for full fine-pruning)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--schedule", default=d["schedule"], choices=["onecycle", "cosine", "step", "constant"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--max-steps-per-epoch", type=int, default=d["max_steps_per_epoch"])
    p.add_argument("--data-dir")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    p.add_argument("--train-subset", type=int, help="use only this many training images (short runs)")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency of source and merged model")
    add_repeat_channels(p)
    p.add_argument("-o", "--output", required=True, help="bundle folder")
    add_common(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("merge", help="fuse a bundle with its source into a plain dense pruned model",
                       description="Rebuild the task model from BUNDLE and its source, remove the pruned channels "
                       "and fuse the adapters away: a registered architecture at pruned widths, reloadable with "
                       "`metaprune eval`.")
    p.add_argument("bundle", help="bundle folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--source", help="the bundle's source model (default: the shipped checkpoint)")
    p.add_argument("-o", "--output", required=True, help="output model file (.safetensors) or folder")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    add_common(p)
    p.set_defaults(func=cmd_merge)


def cmd_adapt(args: argparse.Namespace) -> int:
    from spa.api import AdaptConfig, adapt_task

    src = model_path(args, "source")
    guard(args, [src], files=output_folder_files(args.output, "adapter_config.json", "adapter_model.safetensors",
                                                 "report.json"))
    cfg = AdaptConfig.from_namespace(args)
    res = adapt_task(src, args.task, args.output, cfg)
    r = res.report
    status(args, f"adapt {args.task}: test {r['test_acc']:.2f}% (masked {r['test_acc_masked']:.2f}%), "
           f"{r['learned_params']['total']:,} learned params, bundle {r['bundle_bytes']:,} B = "
           f"{100 * r['bundle_to_dense']:.1f}% of the dense pruned model ({r['dense_pruned_bytes']:,} B), "
           f"{r['macs']['pruned'] / 1e6:.2f} M MACs (source {r['macs']['source'] / 1e6:.2f} M) -> {res.bundle_dir}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaprune.engine import count_params
    from metaprune.io import load_model, save_model
    from spa.bundle import merge, read_bundle

    src = model_path(args, "source")
    guard(args, [src, args.bundle], files=[model_output_file(args.output)])
    cfg, _ = read_bundle(args.bundle)
    source, _ = load_model(src)
    model = merge(args.bundle, source.eval())
    out = save_model(model, Path(args.output), extra={"command": "merge", "bundle": str(args.bundle),
                                                      "task": cfg.get("task"), "method": cfg.get("method"),
                                                      "source_sha256": cfg["source_sha256"]},
                     inputs=(src, args.bundle))
    summary = {"output": str(out), "task": cfg.get("task"), "params": count_params(model),
               "source_params": count_params(source), "bytes": out.stat().st_size}
    if args.json:
        print_json(summary)
    status(args, f"merge: {summary['params']:,} params (source {summary['source_params']:,}) -> {out}")
    return 0
