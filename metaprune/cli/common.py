"""Options and helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from metaprune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"
DEFAULT_MODEL = CHECKPOINTS / "cifar_resnet20_fmnist.safetensors"
DEFAULT_METANET = CHECKPOINTS / "metanet_cifar_resnet_fmnist"
DEFAULT_RANK_METANET = CHECKPOINTS / "metanet_rank_fmnist"


def add_common(p: argparse.ArgumentParser) -> None:
    """--config, --device, --seed, --quiet."""
    p.add_argument("--config", help="YAML preset (see configs/); flags given on the command line override it")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")


def add_data(p: argparse.ArgumentParser, required: bool = False, default: str | None = None) -> None:
    """--data, --data-dir, --download, --val-fraction, --train-subset."""
    p.add_argument("--data", required=required, default=default,
                   help="dataset or task: fashion-mnist, cifar10, cifar100, imagefolder:PATH, synthetic, or a task "
                   "(see `metaprune list-models --data`)")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs a network)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training data held out for selection")
    p.add_argument("--train-subset", type=int, help="use only this many training images (short runs)")
    add_repeat_channels(p)


def add_repeat_channels(p: argparse.ArgumentParser) -> None:
    """--repeat-channels: grey images for a colour model."""
    p.add_argument("--repeat-channels", action="store_true",
                   help="repeat 1-channel images (Fashion-MNIST) to the model's input channels, grey -> RGB, for a "
                   "model that takes colour images (e.g. a torchvision or timm state dict)")


def add_train(p: argparse.ArgumentParser, epochs: int = 30, lr: float = 0.1) -> None:
    """The options of :class:`metaprune.engine.TrainConfig`."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd (Nesterov momentum) or adamw (momentum = its beta1; ViTs: e.g. --lr 1e-3 --weight-decay 0.05)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine", "step", "constant"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-resume", action="store_true", help="ignore a resume checkpoint in the output folder")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of each epoch (quick runs)")


def train_config(args: argparse.Namespace, **over):
    """A :class:`TrainConfig` from parsed options."""
    from metaprune.engine import TrainConfig

    kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, schedule=args.schedule, label_smoothing=args.label_smoothing,
              augment=not args.no_augment, amp=not args.no_amp, seed=args.seed, device=args.device,
              resume=not args.no_resume, max_steps_per_epoch=args.max_steps_per_epoch,
              sparse_reg=getattr(args, "sparse_reg", 0.0) or 0.0,
              optimizer=getattr(args, "optimizer", "sgd"))
    kw.update(over)
    return TrainConfig(**kw)


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Load ``--config`` YAML as defaults, then re-parse so flags given on the command line win."""
    if not getattr(args, "config", None):
        return args
    import yaml

    path = Path(args.config)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; presets are in {ROOT / 'configs'}")
    if not path.is_file():
        raise ConfigError(f"--config {path} is not a file; give a YAML preset (see {ROOT / 'configs'})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; give a YAML preset (see {ROOT / 'configs'})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or "malformed"
        raise ConfigError(f"{path} is not valid YAML{at}: {what}; write `option: value` lines, one section per "
                          "command (see configs/)") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must be a mapping of option: value, not {type(cfg).__name__}")
    # a preset holds one section per command (`train:`, `prune:`, ...); flat presets apply as they are
    sections = {k for k, v in cfg.items() if isinstance(v, dict)}
    if sections:
        if args.command not in cfg:
            raise ConfigError(f"{path} has no `{args.command}:` section (it has: {', '.join(sorted(sections))})")
        cfg = cfg[args.command]
    cfg = {k.replace("-", "_"): v for k, v in cfg.items() if k not in ("description",)}
    unknown = sorted(k for k in cfg if not hasattr(args, k))
    if unknown:
        raise ConfigError(f"{path}: options {unknown} do not exist for `metaprune {args.command}`; "
                          f"valid: {sorted(k for k in vars(args) if k not in ('func', 'command'))}")
    sub = _subparser(parser, args.command)
    actions = {a.dest: a for a in sub._actions}  # noqa: SLF001 - argparse has no public accessor
    cfg = {k: _coerce(actions.get(k), k, v, path) for k, v in cfg.items()}
    sub.set_defaults(**cfg)
    return parser.parse_args(argv)


def _coerce(action: argparse.Action | None, key: str, value, path: Path):
    """A preset value checked against its option: the option's type, choices, flag or list."""
    if action is None or value is None:
        return value
    flag = f"{key} (--{key.replace('_', '-')})"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {flag} is a switch; write true or false, not {value!r}")
        return value
    if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x, maybe with an "auto" default
        if isinstance(value, bool) or (value == "auto" and action.default == "auto"):
            return value
        also = " or auto" if action.default == "auto" else ""
        raise ConfigError(f"{path}: {flag} is a switch; write true or false{also}, not {value!r}")
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise ConfigError(f"{path}: {flag} must be a value or a list of values, not {value!r}")
        return [_coerce_one(action, flag, v, path) for v in items]
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{path}: {flag} must be a single value, not {type(value).__name__} {value!r:.60}")
    return _coerce_one(action, flag, value, path)


def _coerce_one(action: argparse.Action, flag: str, value, path: Path):
    typ = action.type
    if isinstance(value, bool) and typ is not None:
        raise ConfigError(f"{path}: {flag} must be {'an integer' if typ is int else 'a number'}, not {value!r}")
    if typ is int:
        if isinstance(value, float) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: {flag} must be an integer, not {value!r}")
    if typ is not None:
        try:
            value = typ(value)
        except (TypeError, ValueError):
            want = {int: "an integer", float: "a number"}.get(typ, f"a valid {getattr(typ, '__name__', 'value')}")
            raise ConfigError(f"{path}: {flag} must be {want}, not {value!r}") from None
    elif not isinstance(value, str):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: {flag} must be a string, not {value!r}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{path}: {flag} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[name]
    raise KeyError(name)


# commands that load a model file: they take --arch & co for bare state dicts (see add_arch)
MODEL_COMMANDS = ("prune", "curve", "eval", "finetune", "convert", "adapt", "export", "transform", "merge")


def add_arch(p: argparse.ArgumentParser) -> None:
    """--arch, --num-classes, --in-chans, --input-size, --trust-code: how to build a bare state dict."""
    g = p.add_argument_group("architecture of a bare state dict (a metaprune .safetensors file says what it is)")
    g.add_argument("--arch", help="architecture of the weights: a registered name, torchvision:NAME, timm:NAME "
                   "(needs the timm extra) or pkg.module:factory (needs --trust-code); default: matched by tensor "
                   "names (registered and torchvision models). See `metaprune list-models --all`")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: read from the weights)")
    g.add_argument("--in-chans", type=int, help="input channels (default: read from the weights)")
    g.add_argument("--input-size", type=int, help="input height = width in pixels the model is used at: MACs, "
                   "latency, export and graphs without --data, synthetic data; recorded in the output model (default: "
                   "the size the model file records (trained / pruned at), else the architecture's own, 224 for "
                   "most torchvision/timm models)")
    g.add_argument("--trust-code", action="store_true", help="allow --arch pkg.module:factory (and model files "
                   "naming one): this IMPORTS AND RUNS that Python module, so only use code you trust")


def arch_context(args: argparse.Namespace):
    """The context a command runs in: --arch for bare state dicts, --trust-code for user factories."""
    import contextlib

    from metaprune.io import arch_for_state_dicts
    from metaprune.models import trusted_code

    stack = contextlib.ExitStack()
    stack.enter_context(trusted_code(bool(getattr(args, "trust_code", False))))
    arch = getattr(args, "arch", None)
    kw = {"num_classes": getattr(args, "num_classes", None), "in_chans": getattr(args, "in_chans", None),
          "image_size": getattr(args, "input_size", None)}
    for k, v in kw.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{k.replace('_', '-').replace('image-size', 'input-size')} must be >= 1, not {v}")
    if arch is None and (kw["num_classes"] is not None or kw["in_chans"] is not None):
        raise ConfigError("--num-classes and --in-chans describe a bare state dict's architecture: give --arch too")
    if arch is not None:
        from metaprune.models import get_entry

        get_entry(arch)  # an unknown name, missing timm or untrusted code fails here, before any work
    stack.enter_context(arch_for_state_dicts(arch, {k: v for k, v in kw.items() if v is not None},
                                             input_size=kw["image_size"]))
    return stack


def setup_runtime(args: argparse.Namespace) -> None:
    """Logging, progress bars and threads, from the common options."""
    from metaprune.engine.runtime import resolve_device, set_quiet

    set_quiet(bool(getattr(args, "quiet", False)))
    if getattr(args, "device", None) is not None:  # every verb: a bad --device is refused before any work
        resolve_device(args.device)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)


def status(args: argparse.Namespace, msg: str) -> None:
    """One status line on stderr (silent with --quiet, and on non-zero ranks)."""
    if not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


def model_path(args: argparse.Namespace, attr: str = "model") -> str:
    """The model the user named, or the shipped default (said so on stderr)."""
    p = getattr(args, attr, None)
    if p:
        return p
    if getattr(args, "arch", None):
        raise ConfigError(f"--arch {args.arch} names the architecture of a model file, but no model file was given "
                          "(the shipped default is a cifar_resnet20); pass the weights file, e.g. a state dict saved "
                          "with torch.save(model.state_dict(), 'model.pt')")
    if not DEFAULT_MODEL.exists():
        raise ConfigError(f"no model given and the shipped default {DEFAULT_MODEL} is missing; pass a model file")
    status(args, f"no model given: using the shipped default {DEFAULT_MODEL.relative_to(ROOT)}")
    return str(DEFAULT_MODEL)


def load_data_for(args: argparse.Namespace, model=None, name: str | None = None):
    """Load ``--data`` (synthetic data is shaped to fit ``model``)."""
    from metaprune.data import load_dataset

    name = name or args.data
    kw = {}
    if name == "synthetic" or (name or "").startswith("imagefolder:"):
        spec = getattr(model, "metaprune_arch", {}).get("args", {}) if model is not None else {}
        recorded = (getattr(model, "metaprune_arch", None) or {}).get("input_size") if model is not None else None
        kw = {"in_chans": spec.get("in_chans"), "num_classes": spec.get("num_classes"),
              "image_size": recorded or spec.get("image_size") or _image_size(model)}
    data = load_dataset(name, args.data_dir, val_fraction=args.val_fraction, seed=args.seed,
                        download=args.download, train_subset=args.train_subset, **kw)
    want = getattr(model, "metaprune_arch", {}).get("args", {}).get("in_chans") if model is not None else None
    if getattr(args, "repeat_channels", False) and isinstance(want, int) and want != data.in_chans:
        from metaprune.data.datasets import repeat_channels  # grey images for a colour model: grey -> RGB

        data = repeat_channels(data, want)
        status(args, f"{data.name}: 1-channel images repeated to the model's {want} input channels")
    return data


def _image_size(model) -> int:
    from metaprune.models import get_entry

    spec = getattr(model, "metaprune_arch", None)
    if spec is None:
        return 32
    return min(get_entry(spec["arch"]).default_image_size, 64) if spec["arch"] != "vit_b_16" else 224


def check_fits(model, data) -> None:
    """Refuse a dataset whose channels or classes don't fit the model."""
    args = getattr(model, "metaprune_arch", {}).get("args", {})
    if args.get("in_chans") not in (None, data.in_chans):
        hint = " (or pass --repeat-channels to repeat its grey images)" if data.in_chans == 1 else ""
        raise ConfigError(f"the model takes {args['in_chans']}-channel images but {data.name} has {data.in_chans}; "
                          f"use data with {args['in_chans']} channels{hint}, or build the model with "
                          f"in_chans={data.in_chans}")
    if args.get("num_classes") not in (None, data.num_classes):
        raise ConfigError(f"the model has {args['num_classes']} classes but {data.name} has {data.num_classes}")


def guard(args: argparse.Namespace, inputs=(), files=(), folders=()) -> None:
    """Before any work: refuse outputs that would replace an input of this command (the ``--config``
    file included), through symlinks too. ``files`` are the exact output files, ``folders`` output
    folders the command fills freely (they must hold no input). See :func:`metaprune.io.guard_outputs`."""
    from metaprune.io import guard_outputs

    guard_outputs([*inputs, getattr(args, "config", None)], files=files, folders=folders)


def output_folder_files(out, *names: str) -> list[Path]:
    """``out/name`` for each name (the files a command writes into its output folder)."""
    return [Path(out) / n for n in names]


def model_output_file(out) -> Path:
    """Where :func:`metaprune.io.save_model` writes for ``-o out`` (a ``.safetensors`` file, or a folder)."""
    p = Path(out)
    return p if p.suffix == ".safetensors" else p / "model.safetensors"


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))
