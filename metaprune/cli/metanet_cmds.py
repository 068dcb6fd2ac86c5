"""``zoo``, ``meta-train``, ``transform``: the metanetwork stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from metaprune.cli.common import (
    DEFAULT_METANET,
    add_common,
    add_data,
    add_train,
    check_fits,
    guard,
    load_data_for,
    model_path,
    status,
    train_config,
)
from metaprune.errors import ConfigError


def register(sub) -> None:
    from metaprune.metanet.zoo import ZooConfig

    p = sub.add_parser("zoo", help="train the data models a metanetwork learns from",
                       description="Train COUNT networks of one architecture with different seeds (optionally "
                       "pruned to a small speed-up and finetuned, as in the paper). Resumable: finished members "
                       "are skipped, an interrupted one resumes.")
    p.add_argument("--model", default="cifar_resnet20", help="registry name of the architecture")
    add_data(p, default="fashion-mnist")
    zc = ZooConfig()  # the library's defaults are the CLI's
    add_train(p, epochs=zc.train.epochs, lr=zc.train.lr)
    p.add_argument("--count", type=int, default=zc.count, help="number of data models")
    p.add_argument("--init-speedup", type=float, default=zc.init_speedup,
                   help="prune each member to this MAC speed-up and finetune it (1.0 = no initial pruning)")
    p.add_argument("--finetune-epochs", type=int, default=zc.finetune_epochs,
                   help="finetune epochs after the initial pruning")
    p.add_argument("-o", "--output", required=True, help="zoo folder")
    add_common(p)
    p.set_defaults(func=cmd_zoo)

    from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
    from metaprune.metanet.rank import RANK_LOSSES, RankTrainConfig

    rd, mt, nc = RankTrainConfig(), MetaTrainConfig(), MetanetConfig()  # the library's defaults are the CLI's
    p = sub.add_parser("meta-train", help="train a metanetwork on a zoo of data models",
                       description="Loss = CE of the edited network + LAM x DepGraph group sparsity (normalised to "
                       "1 on the unedited member) + MU x CE of the edited network with a random fraction of channels "
                       "removed as uniform L2 pruning would remove them. Defaults: the shipped recipe (function-"
                       "preserving --edit scale); --edit residual --prune-aware 0 --bn-eval is the paper's loss. The checkpoint is chosen by the prunability score of the "
                       "validation members on validation data. Resumable; OUT/log.jsonl logs every epoch.")
    p.add_argument("--zoo", required=True, nargs="+", help="zoo folder (from `metaprune zoo`); with --output-mode "
                   "score one or more zoos of training members")
    p.add_argument("-o", "--output", required=True, help="output folder (metanet.safetensors, config.json, log.jsonl)")
    p.add_argument("--output-mode", choices=("edit", "score"), default="edit",
                   help="edit: a metanetwork that edits weights (the loss above); score: one importance score per "
                   "channel, trained with a ListNet ranking loss to reproduce each member's `gate` ranking (cached "
                   "targets, see tools/gate_targets.py), used with `prune --criterion metanet --metanet OUT`")
    p.add_argument("--members", nargs="+", default=None, metavar="ZOO/MEMBER",
                   help="score mode: train on these member folders instead of every member of --zoo")
    p.add_argument("--val-zoo", nargs="+", default=[], help="score mode: zoos of validation members (ranking "
                   "agreement logged, never trained on)")
    p.add_argument("--steps", type=int, default=rd.steps, help="score mode: gradient steps (one member each)")
    p.add_argument("--rank-loss", choices=list(RANK_LOSSES), default=rd.loss,
                   help="score mode: listnet (the whole gate ranking per group) or pairwise (only which channels "
                   "the gate keeps at --target-speedup: softplus of removed-minus-kept score differences)")
    p.add_argument("--tau", type=float, default=rd.tau, help="score mode: temperature of the target ranking "
                   "distribution (standardised gate scores; smaller focuses on the top); pairwise: of the "
                   "score differences")
    p.add_argument("--average-from", type=float, default=rd.average_from,
                   help="score mode: the saved weights average every step from this fraction of --steps on")
    p.add_argument("--target-speedup", type=float, default=3.0, help="score mode: MAC speed-up of the gate targets")
    p.add_argument("--targets", default="runs/gate_targets", help="score mode: gate-target cache folder")
    p.add_argument("--accept-gate-sha", nargs="+", default=[], metavar="SHA",
                   help="score mode: also accept cached targets computed by these earlier gate.py versions (sha256 "
                   "prefixes of >= 8 hex digits; recorded in the checkpoint)")
    p.add_argument("--compute-targets", action="store_true",
                   help="score mode: compute missing or stale gate targets (needs the zoos' data; 1-4 CPU-min each)")
    p.add_argument("--data", help="dataset (default: the zoo's)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--epochs", type=int, default=mt.epochs)
    p.add_argument("--steps-per-member", type=int, default=mt.steps_per_member)
    p.add_argument("--batch-size", type=int, default=mt.batch_size)
    p.add_argument("--lr", type=float, default=mt.lr)
    p.add_argument("--weight-decay", type=float, default=mt.weight_decay)
    p.add_argument("--lam", type=float, default=mt.lam, help="weight of the (normalised) group-sparsity term")
    p.add_argument("--alpha", type=float, default=mt.alpha, help="DepGraph polarisation of the sparsity term")
    p.add_argument("--sparsity", choices=("depgraph", "functional"), default=mt.sparsity,
                   help="depgraph: group sparsity on every coupled slice (paper); functional: BatchNorm-aware and "
                   "scale-invariant (only slices a channel's function depends on)")
    p.add_argument("--prune-aware", type=float, default=mt.prune_aware, metavar="MU",
                   help="weight of the pruning-aware term: CE of the edited network with a random fraction of "
                   "channels softly removed by the L2 ranking the pruner uses (0 = off, the paper's loss)")
    p.add_argument("--prune-temperature", type=float, default=mt.prune_temperature,
                   help="softness of the pruning-aware gates (relative to the median channel norm)")
    p.add_argument("--soft-gates", action="store_true", default=not mt.prune_hard,
                   help="pruning-aware term with soft gates in the forward pass too (default: straight-through "
                   "gates, i.e. the exact pruned network forward and the soft gates' gradient)")
    p.add_argument("--bn-eval", action="store_true", default=mt.bn_eval,
                   help="members' BatchNorm in eval mode (original running statistics) during meta-training")
    p.add_argument("--val-members", type=int, default=mt.val_members, help="members held out for checkpoint selection")
    p.add_argument("--holdout-members", type=int, default=mt.holdout_members,
                   help="members used neither for training nor selection")
    p.add_argument("--score-max-speedup", type=float, default=mt.score_max_speedup)
    p.add_argument("--score-steps", type=int, default=mt.score_steps)
    p.add_argument("--score-batches", type=int, default=mt.score_batches)
    p.add_argument("--hidden", type=int, default=nc.hidden, help="metanetwork width")
    p.add_argument("--layers", type=int, default=nc.layers, help="message-passing layers")
    p.add_argument("--rho", type=float, default=None,
                   help="edit size: the residual edit in per-layer units (default 0.05), or the bound of log s "
                   "before its per-layer centring for --edit scale (default 1.0)")
    p.add_argument("--edit", choices=("residual", "scale"), default=nc.edit,
                   help="residual: edit every weight (paper); scale: function-preserving per-channel rescaling of "
                   "BN-normalised layers that changes which channels the L2 pruner keeps")
    p.add_argument("--edge-chunk", type=int, help="process edges in chunks of this size")
    p.add_argument("--checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--no-resume", action="store_true")
    add_common(p)
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("transform", help="edit a model with a metanetwork (one forward pass)",
                       description="Convert MODEL to a graph, run the metanetwork once, convert back, re-estimate "
                       "BatchNorm statistics on training batches, optionally finetune.")
    p.add_argument("model", nargs="?", help="model file (default: the shipped checkpoint)")
    p.add_argument("--metanet", help=f"metanetwork folder (default: {DEFAULT_METANET.name} shipped in checkpoints/)")
    p.add_argument("-o", "--output", required=True, help="edited model (.safetensors)")
    add_data(p, default="fashion-mnist")
    p.add_argument("--calib-batches", type=int, default=8, help="training batches for BN recalibration (0 = keep)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="finetune the edited model for this many epochs")
    p.add_argument("--lr", type=float, default=0.01, help="finetune learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    add_common(p)
    p.set_defaults(func=cmd_transform)


def cmd_zoo(args: argparse.Namespace) -> int:
    from metaprune.metanet.zoo import ZooConfig, build_zoo
    from metaprune.models import create_model

    def config(data_name: str) -> ZooConfig:
        return ZooConfig(arch=args.model, data=data_name, count=args.count, seed=args.seed, data_seed=args.seed,
                         val_fraction=args.val_fraction, train_subset=args.train_subset,
                         init_speedup=args.init_speedup, finetune_epochs=args.finetune_epochs, train=train_config(args))

    config(str(args.data))  # every option checked before data is loaded or anything written
    guard(args, folders=[args.output])
    probe = create_model(args.model, 10, 3)
    data = load_data_for(args, probe)
    cfg = config(data.name)
    status(args, f"zoo: {args.count} x {args.model} on {data.describe()}")
    res = build_zoo(cfg, data, args.output)
    for m in res:
        status(args, f"member {m['index']}: val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  speed-up {m['speedup']:.2f}x")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
    from metaprune.metanet.meta_train import meta_train

    if args.output_mode == "score":
        return _meta_train_score(args)
    if len(args.zoo) != 1:
        raise ConfigError("meta-train (edit mode) reads one --zoo folder; several are read with --output-mode score")
    args.zoo = args.zoo[0]

    cfg = MetaTrainConfig(epochs=args.epochs, steps_per_member=args.steps_per_member, batch_size=args.batch_size,
                          lr=args.lr, weight_decay=args.weight_decay, lam=args.lam, alpha=args.alpha, sparsity=args.sparsity,
                          prune_aware=args.prune_aware, prune_temperature=args.prune_temperature,
                          prune_hard=not args.soft_gates,
                          val_members=args.val_members, holdout_members=args.holdout_members,
                          score_max_speedup=args.score_max_speedup, score_steps=args.score_steps,
                          score_batches=args.score_batches, bn_eval=args.bn_eval, seed=args.seed,
                          device=args.device)  # as given (checked in setup_runtime): resolved per process
    ncfg = MetanetConfig(hidden=args.hidden, layers=args.layers, rho=args.rho, edit=args.edit, edge_chunk=args.edge_chunk,
                         checkpoint=args.checkpointing)
    guard(args, [args.zoo], folders=[args.output])
    from metaprune.errors import TrainingError
    from metaprune.metanet.zoo import load_zoo_data

    data = load_zoo_data(args.zoo, args.data, args.data_dir)
    status(args, f"meta-train on {args.zoo}: {data.describe()}")
    s = meta_train(args.zoo, data, args.output, cfg, ncfg, resume=not args.no_resume)
    weights = Path(args.output) / "metanet.safetensors"
    if s["selected_epoch"] < 0 or not weights.exists():
        raise TrainingError(f"meta-train selected no epoch, so no metanetwork was written to {args.output}")
    status(args, f"meta-train: selected epoch {s['selected_epoch']} (validation prunability {s['val_score']:.2f}, "
           f"unedited {s['val_score_unedited']:.2f}) -> {weights}")
    return 0


def _meta_train_score(args: argparse.Namespace) -> int:
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.rank import RankTrainConfig, rank_meta_train

    cfg = RankTrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, tau=args.tau,
                          loss=args.rank_loss,
                          average_from=args.average_from, speedup=args.target_speedup, seed=args.seed)
    ncfg = MetanetConfig(hidden=args.hidden, layers=args.layers, output="score", edge_chunk=args.edge_chunk,
                         checkpoint=args.checkpointing)
    guard(args, [*args.zoo, *args.val_zoo], folders=[args.output])
    s = rank_meta_train(args.zoo, args.val_zoo, args.output, cfg, ncfg, cache=args.targets,
                        compute_targets=args.compute_targets, resume=not args.no_resume,
                        log=lambda m: status(args, m), accept_gate_sha=tuple(args.accept_gate_sha),
                        only_members=args.members)
    v = s["final"]
    status(args, f"meta-train (score): {s['steps']} steps in {s['train_seconds']:.0f} s -> {args.output}"
           + (f"; validation keep-set overlap with gate at {args.target_speedup:g}x: metanet {v['metanet_overlap']:.3f}, "
              f"l2 {v['l2_overlap']:.3f}, functional {v['functional_overlap']:.3f}" if v else ""))
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    from metaprune.engine import TrainConfig
    from metaprune.engine.runtime import resolve_device
    from metaprune.fingerprint import check_int
    from metaprune.io import check_output, load_model, save_model
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.transform import transform_model

    check_int("--calib-batches", args.calib_batches, 0)
    check_int("--finetune-epochs", args.finetune_epochs, 0)
    # finetune options checked even when unused (a typo should not pass silently)
    ft_cfg = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         device=args.device, schedule="cosine")
    src = model_path(args)
    out = Path(args.output)
    if out.suffix != ".safetensors":
        out = out / "model.safetensors"
    mdir = args.metanet or str(DEFAULT_METANET)
    guard(args, [src, mdir], files=[out])
    check_output(out, (src,))
    if not args.metanet:
        status(args, f"no --metanet given: using the shipped {DEFAULT_METANET.name}")
    net, meta = load_metanet(mdir)
    model, info = load_model(src, trust_pickle=args.trust_pickle)
    device = resolve_device(args.device)
    data = None
    if args.calib_batches > 0 or args.finetune_epochs > 0:
        data = load_data_for(args, model)
        check_fits(model, data)
    edited = transform_model(net, model, data.train if data is not None else None, args.calib_batches,
                             device=device)
    extra = {**info.extra, "metanet": str(mdir), "transformed_from": src, "bn_recalibrated": args.calib_batches}
    if args.finetune_epochs > 0:
        from metaprune.engine import train

        res = train(edited.train(), data, ft_cfg, desc="finetune")
        edited = res.model
        extra.update(finetune_epochs=args.finetune_epochs, val_acc=res.best_val_acc)
    path = save_model(edited, out, extra=extra, inputs=(src,))
    status(args, f"transform: {src} edited by {mdir} -> {path}")
    return 0
