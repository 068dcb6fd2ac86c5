"""``prune``, ``curve``, ``report``: structured pruning, prunability curves, reading reports."""

from __future__ import annotations

import argparse
from pathlib import Path

from metaprune.cli.common import (
    add_common,
    add_data,
    add_train,
    guard,
    load_data_for,
    model_path,
    output_folder_files,
    print_json,
    status,
    train_config,
)
from metaprune.errors import ConfigError


def _add_prune_options(p: argparse.ArgumentParser, reconstruct_default=None) -> None:
    """Ranking, refit and layer options of ``prune`` and ``curve``; ``reconstruct_default``: the refit's default
    (None: :class:`PruneConfig`'s)."""
    from metaprune.pruning.config import CRITERIA, PruneConfig  # the library's defaults are the CLI's

    if reconstruct_default is None:
        reconstruct_default = PruneConfig.reconstruct

    p.add_argument("--criterion", default=PruneConfig.criterion, choices=list(CRITERIA),
                   help="channel importance: functional (default; ||(gamma,beta)|| x ||next layer's input columns||, "
                   "free), l2 / l1 (group magnitude, torch-pruning's default), bn (BatchNorm scale), taylor (needs "
                   "--data), random, gate (one score per "
                   "channel optimised on training batches with hard top-k gates; needs --data), metanet (scores "
                   "from one forward pass of a score metanetwork, --metanet)")
    p.add_argument("--metanet", help="score-metanetwork folder of --criterion metanet (e.g. checkpoints/metanet_rank_fmnist)")
    p.add_argument("--gate-steps", type=int, default=PruneConfig.gate_steps,
                   help="training steps (batches of 128) of --criterion gate")
    auto = reconstruct_default == "auto"
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=reconstruct_default,
                   help="after pruning, refit the layers reading pruned channels by least squares so their outputs "
                   "match the unpruned model's on calibration batches, then recalibrate BatchNorm (needs --data)"
                   + ("; default: on with --data (the best method measured, README), off without; "
                      "--no-reconstruct skips it" if auto else "; default: off"))
    p.add_argument("--reconstruct-batches", type=int, default=PruneConfig.reconstruct_batches,
                   help="calibration batches (of 128) of --reconstruct")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank all layers together (non-uniform widths) instead of the same share per layer")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="layer (module path, e.g. layer1.0.conv1) whose output width is kept; repeatable. "
                   "The classifier is always kept")


def register(sub) -> None:
    p = sub.add_parser("prune", help="remove channels / heads structurally (torch-pruning DepGraph)",
                       description="Prune a model file to a channel ratio, a MAC speed-up or a parameter reduction; "
                       "writes OUT/model.safetensors and OUT/report.json and prints before/after numbers.")
    p.add_argument("model", nargs="?", help="model file (default: the shipped checkpoint)")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--ratio", type=float, help="share of prunable channels (and heads) removed, 0 < R < 1")
    tgt.add_argument("--speedup", type=float, help="prune until base MACs / pruned MACs reaches S (within 2%%)")
    tgt.add_argument("--params-ratio", type=float, help="prune until base params / pruned params reaches P")
    _add_prune_options(p)
    p.add_argument("--round-to", default="auto", metavar="auto|block|N",
                   help="widths the hardware can use: 'auto' (default) keeps a multiple that suits the device and "
                   "dtype (CPU fp32 AVX2/AVX-512: 8, CUDA fp16/bf16: 8, CUDA fp32: 4; smaller for narrow layers; "
                   "heads stay whole); 'block': the CPU's whole convolution block (AVX-512: 16, AVX2: 8; a layer "
                   "one block wide may keep half; nearest multiples), for onnxruntime, which pads widths up to "
                   "the block; N: torch-pruning's round_to=N; 1: exact, unrounded widths")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="largest share any layer may lose")
    p.add_argument("--keep-heads", action="store_true", help="do not remove attention heads (ViTs)")
    p.add_argument("--keep-output", action="store_true",
                   help="keep the width of every layer that produces a model output (feature extractors, backbones, "
                   "several outputs) instead of only the classifier; without it a pruning that would change the "
                   "output shapes is refused")
    p.add_argument("--finetune-epochs", type=int, default=0, help="finetune the pruned model this many epochs (--data)")
    add_data(p)
    add_train(p, epochs=0, lr=0.01)
    p.add_argument("--eval-batches", type=int, help="evaluate accuracy on at most this many test batches (>= 1; "
                   "default: all)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--latency-runtime", default="torch", metavar="torch[,onnxruntime]",
                   help="runtimes whose latency before/after the report holds: torch (default), or "
                   "torch,onnxruntime: both models are also exported to ONNX and timed in onnxruntime (CPU provider; "
                   "CUDA provider with --device cuda and onnxruntime-gpu) in the same interleaved rounds and "
                   "threads as PyTorch (slower; needs pip install metaprune[export])")
    p.add_argument("--task", action="append", default=[], help="adapt the source to this task with spa: one pruned "
                   "adapter bundle per task; repeatable")
    p.add_argument("--method", default="splora", help="spa adapter method used with --task")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("curve", help="accuracy vs MAC speed-up without finetuning, and its AUC (prunability)",
                       description="Prune step by step (no finetuning), recalibrate BatchNorm on a few training "
                       "batches, measure validation accuracy; writes OUT/curve.json and OUT/curve.png.")
    p.add_argument("model", nargs="?", help="model file (default: the shipped checkpoint)")
    add_data(p, default="fashion-mnist")
    _add_prune_options(p, False)  # prunability_curve's default (tests/cli/test_defaults.py)
    p.add_argument("--max-speedup", type=float, default=3.0, help="right end of the curve and of its AUC")
    p.add_argument("--steps", type=int, default=6, help="number of pruned points")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches per point (0: all)")
    p.add_argument("--calib-batches", type=int, default=8, help="training batches for BatchNorm recalibration")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_common(p)
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("report", help="print a prune report.json as a table")
    p.add_argument("path", help="report.json or the folder that holds it")
    p.add_argument("--json", action="store_true", help="print the JSON itself")
    p.set_defaults(func=cmd_report)


def cmd_prune(args: argparse.Namespace) -> int:
    if args.eval_batches is not None and args.eval_batches < 1:
        raise ConfigError(f"--eval-batches {args.eval_batches} must be >= 1 (leave it out to evaluate the whole test "
                          "split, or leave out --data for no accuracy)")
    runtimes = _latency_runtimes(args)
    src = model_path(args)
    guard(args, [src], folders=[args.output] if args.task else (),
          files=() if args.task else output_folder_files(args.output, "model.safetensors", "report.json", "last.pt"))
    if args.task:
        try:
            from spa.api import adapt_tasks
        except ImportError as e:
            raise ConfigError(f"--task needs the spa package's adapt_tasks (spa.api), which is not available ({e}); "
                              "prune without --task, or install/update spa") from None
        if args.ratio is None:
            raise ConfigError("--task needs --ratio (the share of channels the adapters prune)")
        if args.reconstruct is True:
            raise ConfigError("--reconstruct refits a pruned model; with --task the adapters are trained on each task "
                              "instead (spa): leave out --reconstruct")
        results = adapt_tasks(src, args.task, args.method, args.ratio, args.output, args)
        for task, res in zip(args.task, results or []):
            print(f"{task}: bundle {getattr(res, 'bundle_dir', res)}")
        return 0
    from metaprune.pruning import PruneConfig, format_table
    from metaprune.pruning.pipeline import prune_file

    cfg = PruneConfig(ratio=args.ratio, speedup=args.speedup, params_ratio=args.params_ratio,
                      criterion=args.criterion, global_pruning=args.global_pruning, round_to=args.round_to,
                      ignore=tuple(args.ignore), max_layer_ratio=args.max_layer_ratio,
                      prune_heads=not args.keep_heads, keep_output=args.keep_output, seed=args.seed,
                      gate_steps=args.gate_steps, reconstruct=args.reconstruct, reconstruct_batches=args.reconstruct_batches,
                      metanet=args.metanet)
    data = None
    if args.data:
        from metaprune.io import load_model

        probe, _ = load_model(src, trust_pickle=args.trust_pickle)
        data = load_data_for(args, probe)
    elif args.finetune_epochs or args.criterion in ("taylor", "gate") or args.reconstruct is True:
        raise ConfigError("--finetune-epochs, --criterion taylor / gate and --reconstruct need --data")
    ft = train_config(args, epochs=args.finetune_epochs) if args.finetune_epochs else None
    refit = data is not None and cfg.reconstruct is not False
    status(args, f"prune: {src} ({cfg.target[0]} {cfg.target[1]:g}, criterion {cfg.criterion}"
           + (", then reconstruction on the training data (--no-reconstruct skips it)" if refit else "") + ")")
    report = prune_file(src, Path(args.output), cfg, data=data, finetune=ft, device=args.device,
                        latency=runtimes, eval_batches=args.eval_batches, trust_pickle=args.trust_pickle)
    if args.json:
        print_json(report)
    else:
        print(format_table(report))
    return 0


def _latency_runtimes(args: argparse.Namespace) -> tuple[str, ...] | bool:
    """False with --no-latency, else the checked --latency-runtime (onnxruntime installed, a provider for
    the device): refused before any work."""
    from metaprune.pruning.report import check_runtimes, parse_runtimes

    runtimes = parse_runtimes(args.latency_runtime)
    if args.no_latency:
        if runtimes != ("torch",):
            raise ConfigError(f"--latency-runtime {args.latency_runtime} measures latency, --no-latency skips it; "
                              "give one of them")
        return False
    if runtimes == ("torch",):
        return runtimes
    from metaprune.engine.runtime import resolve_device

    return check_runtimes(runtimes, resolve_device(args.device))


def cmd_curve(args: argparse.Namespace) -> int:
    from metaprune.engine.runtime import resolve_device
    from metaprune.io import check_output, load_model, write_json
    from metaprune.pruning import plot_curve, prunability_curve
    from metaprune.pruning.curve import check_curve_options

    check_curve_options(args.max_speedup, args.steps, args.val_batches, args.calib_batches, args.batch_size)
    src = model_path(args)
    out = Path(args.output)
    guard(args, [src], files=output_folder_files(out, "curve.json", "curve.png"))
    check_output(out / "curve.json", (src,))
    model, info = load_model(src, trust_pickle=args.trust_pickle)
    data = load_data_for(args, model)
    device = resolve_device(args.device)
    curve = prunability_curve(model, data, max_speedup=args.max_speedup, steps=args.steps, criterion=args.criterion,
                              val_batches=args.val_batches or None, calib_batches=args.calib_batches,
                              batch_size=args.batch_size, device=device, seed=args.seed,
                              global_pruning=args.global_pruning, ignore=tuple(args.ignore),
                              gate_steps=args.gate_steps, reconstruct=args.reconstruct,
                              reconstruct_batches=args.reconstruct_batches, metanet=args.metanet)
    curve.update(source=src, arch=info.arch, data=data.name)
    write_json(out / "curve.json", curve)
    plot_curve(curve, out / "curve.png", title=f"{info.arch} on {data.name}: AUC {curve['auc']:.2f}% to "
               f"{args.max_speedup:g}x")
    print(f"{'speed-up':>10s}{'ratio':>8s}{'val acc':>10s}")
    for s, r, a in zip(curve["speedups"], curve["ratios"], curve["accs"]):
        print(f"{s:>9.2f}x{r:>8.3f}{a:>9.2f}%")
    print(f"prunability (mean val acc over 1..{args.max_speedup:g}x): {curve['auc']:.2f}% "
          f"({curve['auc_rel']:.3f} of unpruned) -> {out / 'curve.json'}, {out / 'curve.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metaprune.errors import ModelFileError
    from metaprune.io import json_type
    from metaprune.pruning import format_table, load_report

    report = load_report(args.path)
    if not isinstance(report, dict):
        raise ModelFileError(f"{args.path}: a report is a JSON object, not {json_type(report)}; give the report.json "
                             "a metaprune command wrote")
    if args.json:
        print_json(report)
        return 0
    try:
        if report.get("command") == "demo":
            from metaprune.demo import format_summary

            text = format_summary(report)
        else:
            text = format_table(report)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ModelFileError(f"{args.path} is not a complete metaprune report (cannot read {type(e).__name__}: "
                             f"{str(e)[:80]}); give the report.json a metaprune command wrote, or use --json") from None
    print(text)
    return 0
