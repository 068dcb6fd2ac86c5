"""``train``, ``eval``, ``finetune``, ``list-models``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from metaprune.cli.common import (
    add_common,
    add_data,
    add_train,
    check_fits,
    guard,
    load_data_for,
    model_path,
    output_folder_files,
    print_json,
    status,
    train_config,
)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a registered architecture from scratch",
                       description="Train with SGD + one-cycle/cosine/step schedule; the best epoch is chosen on a "
                       "validation split carved from the training data; resumes from OUT/last.pt when it was written by "
                       "the same run (same model, data and options; --no-resume starts afresh).")
    p.add_argument("--model", help="registry name (see `metaprune list-models`); required here or in --config")
    add_data(p, default="fashion-mnist")
    add_train(p)
    p.add_argument("--sparse-reg", type=float, default=0.0,
                   help="DepGraph group-norm sparsity regulariser strength (sparse-learning baseline)")
    p.add_argument("-o", "--output", required=True, help="output folder (model.safetensors, report.json)")
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="finetune a model file (e.g. after pruning)")
    p.add_argument("model", nargs="?", help="model file (default: the shipped checkpoint)")
    add_data(p, default="fashion-mnist")
    add_train(p, epochs=5, lr=0.01)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    add_common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="test accuracy, params, MACs and latency of a model file")
    p.add_argument("model", nargs="?", help="model file (default: the shipped checkpoint)")
    add_data(p, default="fashion-mnist")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a .pt holding a whole module")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list-models", help="list registered architectures (and datasets / tasks)")
    p.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'cifar_*'")
    p.add_argument("--data", action="store_true", help="list datasets and tasks instead")
    p.add_argument("--all", action="store_true", help="also list torchvision:NAME and timm:NAME models (usable as "
                   "--arch)")
    p.set_defaults(func=cmd_list_models)


def _train_config(args):
    """The validated training options (before any data is loaded or anything is written)."""
    from metaprune.errors import ConfigError

    cfg = train_config(args)
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 for `metaprune {args.command}`, got {cfg.epochs}")
    return cfg


def _fit_and_save(args, cfg, model, data, out: Path, command: str, source: str | None = None) -> int:
    from metaprune.engine import train
    from metaprune.engine.report import model_summary, write_report
    from metaprune.engine.runtime import is_main, resolve_device
    from metaprune.io import check_output, save_model
    from metaprune.models.registry import set_input_size

    check_output(out / "model.safetensors", (source,))
    regularizer = None
    if cfg.sparse_reg > 0:
        from metaprune.engine.report import input_shape
        from metaprune.pruning import SparseRegularizer

        regularizer = SparseRegularizer(model, input_shape(model, data), cfg.sparse_reg)
    status(args, f"{command}: {data.describe()}")
    res = train(model, data, cfg, out_dir=out, regularizer=regularizer, desc=command)
    if not is_main():
        return 0
    device = resolve_device(args.device)
    set_input_size(res.model, data.image_size)  # recorded in the file: MACs / latency / export default to it
    summary = model_summary(res.model, data, device, split="test")
    val_acc = res.best_val_acc
    path = save_model(res.model, out, extra={"data": data.name, "val_acc": val_acc, "test_acc": summary["test_acc"],
                                             "best_epoch": res.best_epoch, "command": command}, inputs=(source,))
    write_report(out, {"command": command, "source": source, "data": data.name, "config": asdict(cfg),
                       "best_epoch": res.best_epoch, "val_acc": val_acc, "seconds": res.seconds,
                       "model": summary, "history": res.history})
    best = (f"best epoch {res.best_epoch + 1}" if res.best_epoch >= 0 else  # -1: the starting weights won on val
            "no epoch beat the starting weights, kept")
    status(args, f"{command}: {best} (val {val_acc:.2f}%), test {summary['test_acc']:.2f}%, "
           f"{summary['params']:,} params, {summary['macs'] / 1e6:.1f} M MACs -> {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from metaprune.engine import seed_everything
    from metaprune.errors import ConfigError
    from metaprune.models import create_model, create_model_for_data

    if not args.model:
        raise ConfigError("train needs --model NAME (or a --config preset that sets it); see `metaprune list-models`")
    cfg = _train_config(args)
    guard(args, files=output_folder_files(args.output, "model.safetensors", "report.json", "last.pt"))
    probe = create_model(args.model, 10, 3)  # validates the name before loading data
    data = load_data_for(args, probe)
    seed_everything(cfg.seed)  # --seed fixes the initial weights too (the same on every rank)
    model = create_model_for_data(args.model, data.num_classes, data.in_chans, data.image_size)
    return _fit_and_save(args, cfg, model, data, Path(args.output), "train")


def cmd_finetune(args: argparse.Namespace) -> int:
    from metaprune.io import load_model

    cfg = _train_config(args)
    src = model_path(args)
    guard(args, [src], files=output_folder_files(args.output, "model.safetensors", "report.json", "last.pt"))
    model, _ = load_model(src, trust_pickle=args.trust_pickle)
    data = load_data_for(args, model)
    check_fits(model, data)
    return _fit_and_save(args, cfg, model.train(), data, Path(args.output), "finetune", source=src)


def cmd_eval(args: argparse.Namespace) -> int:
    from metaprune.engine.report import model_summary
    from metaprune.engine.runtime import resolve_device
    from metaprune.io import load_model

    src = model_path(args)
    model, info = load_model(src, trust_pickle=args.trust_pickle)
    data = load_data_for(args, model)
    check_fits(model, data)
    device = resolve_device(args.device)
    s = model_summary(model.to(device), data, device, latency=not args.no_latency)
    s["model_file"], s["arch"] = src, info.arch
    if args.json:
        print_json(s)
        return 0
    print(f"model      {src} ({info.arch})")
    print(f"data       {s['data']} test split")
    print(f"accuracy   {s['test_acc']:.2f} %")
    print(f"params     {s['params']:,}")
    print(f"MACs       {s['macs'] / 1e6:,.2f} M per image")
    for b, lat in s.get("latency", {}).items():
        print(f"latency    {lat['ms']:.2f} ms at batch {b} ({lat['device']}, {lat['dtype']}, median of {lat['repeats']})")
    return 0


def cmd_list_models(args: argparse.Namespace) -> int:
    if args.data:
        from metaprune.data import DATASETS, get_task, list_tasks

        for name, desc in DATASETS.items():
            print(f"{name:18s} {desc}")
        for t in list_tasks():
            print(f"{t:18s} task: {get_task(t).description}")
        return 0
    from metaprune.models import get_entry, list_models

    names = list_models(args.pattern)
    for n in names:
        e = get_entry(n)
        print(f"{n:18s} {e.family:13s} {e.default_image_size:>4d}px  {e.description}")
    if getattr(args, "all", False):  # ecosystem models, usable as --arch / create_model names
        import fnmatch

        from metaprune.models import list_external

        ext = [n for n in list_external() if fnmatch.fnmatch(n, args.pattern) or fnmatch.fnmatch(n.split(":")[1],
                                                                                                  args.pattern)]
        print("\n".join(ext))
        if not any(n.startswith("timm:") for n in ext):
            print("(timm:NAME models need the timm extra: pip install 'metaprune[timm]')")
    return 0
