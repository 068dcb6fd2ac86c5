"""High-level entry points: adapt one source model to one or many tasks, producing bundles.

``adapt_task(source_path, task, output_dir, config)`` trains the adapters of one task with
iterative pruning (criterion on the fused weights) and recovery epochs, selects on the task's
validation split, writes the bundle and ``report.json``. ``adapt_tasks`` does it for several
tasks (``output_dir/<task>/``), as used by ``metaprune prune --task A --task B``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from metaprune.engine.runtime import barrier, broadcast_object, is_main
from metaprune.errors import ConfigError
from metaprune.pruning.config import PruneConfig

log = logging.getLogger("spa")


DEFAULT_LR = {"full": 0.01}
"""Learning rate per method when none is given; every adapter method (and the new head) gets ``ADAPTER_LR``."""
ADAPTER_LR = 0.1
_SOURCE_NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""Per-channel mean and std the registered datasets are normalised with (``metaprune.data.datasets``)."""


@dataclass
class AdaptConfig:
    """Options of :func:`adapt_task` (and of ``metaprune adapt``; the CLI has the same defaults).

    Schedule: ``warmup_epochs`` of transfer training (adapters, norms, head; nothing pruned), then
    ``steps`` pruning steps that raise the pruned share of every dependency group linearly to
    ``ratio``, each followed by ``recovery_epochs`` of training. Every phase runs at least
    ``min_steps`` optimisation steps: on a small dataset (few batches an epoch) a phase gets as
    many epochs as that takes, so the schedule scales with the data (``min_steps=0`` runs exactly
    the epochs given; so does a quick run capped by ``max_steps_per_epoch``). ``lr=None`` picks the method's default (``ADAPTER_LR`` for adapters and
    the head, 0.01 for ``full`` fine-pruning, as chosen on the validation split in the README).
    ``criterion`` ranks the channels of each pruning step (:data:`spa.masks.CRITERIA`): ``l2`` (fused
    weights, the default), ``functional`` (``||(gamma, beta)|| x ||fused input columns||``, as
    ``metaprune prune --criterion functional``), ``random`` (seeded by ``seed`` + the step) or ``gate``
    (``gate_steps`` steps of the data-optimised ranking of ``metaprune prune --criterion gate`` at every
    pruning step, on the model as it stands; :mod:`spa.gate`; its seconds are in the history).
    """

    method: str = "splora"
    rank: int = 8
    ratio: float = 0.5
    steps: int = 3
    warmup_epochs: int = 1
    recovery_epochs: int = 1
    min_steps: int = 100
    lr: float | None = None
    batch_size: int = 128
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = True
    max_steps_per_epoch: int | None = None
    data_dir: str | None = None
    val_fraction: float = 0.1
    train_subset: int | None = None
    seed: int = 0
    device: str = "auto"
    latency: bool = False
    repeat_channels: bool = False
    criterion: str = "l2"
    gate_steps: int = PruneConfig.gate_steps
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from metaprune.fingerprint import check_float, check_int

        ints = {"rank": 1, "steps": 1, "warmup_epochs": 0, "recovery_epochs": 0, "min_steps": 0, "batch_size": 1,
                "seed": None, "gate_steps": 1}
        for name, low in ints.items():
            check_int(name, getattr(self, name), low)
        for name in ("max_steps_per_epoch", "train_subset"):
            check_int(name, getattr(self, name), 1, optional=True)
        for name in ("ratio", "weight_decay", "val_fraction", "lr"):
            check_float(name, getattr(self, name), optional=name == "lr")
        if not isinstance(self.method, str):
            raise ConfigError(f"method must be a name (got {self.method!r})")
        from spa.methods import get_method

        get_method(self.method)  # unknown names list the valid ones
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio is the share of channels pruned and must be in [0, 1) (got {self.ratio})")
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method, ADAPTER_LR)
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0 (got lr {self.lr}, weight_decay {self.weight_decay})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; use cosine, onecycle, step or constant")
        from spa.masks import check_criterion

        check_criterion(self.criterion)  # l2, functional, random, gate; prune-only ones are refused with the reason
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a mapping (got {self.method_options!r})")
        if self.method == "lora" and self.ratio > 0:
            raise ConfigError("lora is the unpruned reference (ratio 0); use --method splora to prune")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace | dict, **over) -> AdaptConfig:
        """Build from parsed CLI options (unknown attributes are ignored; ``over`` wins)."""
        d = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if "epochs" in d and d.get("epochs") is not None and "recovery_epochs" not in kw:
            kw["recovery_epochs"] = int(d["epochs"])
        if d.get("no_augment"):
            kw["augment"] = False
        kw.update({k: v for k, v in over.items() if v is not None})
        return cls(**kw)


@dataclass
class AdaptResult:
    """What :func:`adapt_task` returns."""

    bundle_dir: Path
    report: dict
    model: nn.Module


def _method_config(cfg: AdaptConfig):
    from spa.methods import get_method

    cfg_cls, _ = get_method(cfg.method)
    opts = {"rank": cfg.rank, **cfg.method_options}
    return cfg_cls(**opts)


def source_normalisation(info_extra: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean and std of the data the source was trained on (from its file's ``extra.data``), if known."""
    name = str((info_extra or {}).get("data") or "")
    if name in _SOURCE_NORMALISATION:
        return _SOURCE_NORMALISATION[name]
    try:
        from metaprune.data.tasks import get_task

        return _SOURCE_NORMALISATION.get(get_task(name).base)
    except Exception:  # noqa: BLE001 - not a registered task: unknown normalisation
        return None


def _renormalise(data, norm: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    """Give every split of ``data`` (an image folder) the normalisation ``norm`` (in place)."""
    mean, std = norm
    for split in (data.train, data.val, data.test):
        base = getattr(split, "dataset", split)  # train/val are Subsets of one ImageFolder
        base.mean, base.std = tuple(mean), tuple(std)


def load_task_data(task: str, cfg: AdaptConfig, source: nn.Module, source_extra: dict | None = None):
    """A task's splits (registered task, dataset, ``imagefolder:PATH``, ``synthetic``).

    ``imagefolder:`` images are normalised as the source's training data was (mean and std of the
    dataset named in the source file's ``extra.data``), so pixel values mean to the adapted model
    what they meant to the source; when that dataset is unknown, the image folder's own default
    normalisation stays (and the log says so).
    """
    from metaprune.data import load_dataset

    kw = {}
    args = getattr(source, "metaprune_arch", {}).get("args", {})
    if task == "synthetic" or task.startswith("imagefolder:"):
        kw = {"in_chans": args.get("in_chans"), "image_size": args.get("image_size") or 28}
        if task == "synthetic":
            kw["num_classes"] = 4
    data = load_dataset(task, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        train_subset=cfg.train_subset, **kw)
    if cfg.repeat_channels and isinstance(args.get("in_chans"), int) and args["in_chans"] != data.in_chans:
        from metaprune.data.datasets import repeat_channels  # grey images for a colour source: grey -> RGB

        data = repeat_channels(data, args["in_chans"])
        log.info("adapt: %s's 1-channel images repeated to the source's %d input channels", task, args["in_chans"])
    if args.get("in_chans") not in (None, data.in_chans):
        hint = " (repeat_channels=True, --repeat-channels, repeats its grey images)" if data.in_chans == 1 else ""
        raise ConfigError(f"the source takes {args['in_chans']}-channel images but task {task} has "
                          f"{data.in_chans}{hint}")
    if task.startswith("imagefolder:"):
        norm = source_normalisation(source_extra)
        if norm is not None and len(norm[0]) == data.in_chans:
            _renormalise(data, norm)
            log.info("adapt: image folder normalised as the source's data %s (mean %s, std %s)",
                     (source_extra or {}).get("data"), norm[0], norm[1])
        else:
            log.info("adapt: the source's training data (%s) has no known normalisation; the image folder keeps "
                     "its default", (source_extra or {}).get("data"))
    return data


def _train_cfg(cfg: AdaptConfig, epochs: int, seed: int):
    from metaprune.engine import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       schedule=cfg.schedule, augment=cfg.augment, seed=seed, device=cfg.device, resume=False,
                       max_steps_per_epoch=cfg.max_steps_per_epoch, amp=True)


def steps_per_epoch(cfg: AdaptConfig, n_train: int, world_size: int = 1) -> int:
    """Optimisation steps of one epoch over ``n_train`` images (as :func:`metaprune.engine.train` iterates)."""
    per_rank = -(-n_train // world_size)
    n = per_rank // cfg.batch_size if n_train > cfg.batch_size * world_size else -(-per_rank // cfg.batch_size)
    n = max(1, n)
    return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)


def phase_epochs(cfg: AdaptConfig, epochs: int, n_train: int, world_size: int = 1) -> int:
    """Epochs of one phase: ``epochs``, raised so that the phase runs at least ``cfg.min_steps`` steps.

    A phase switched off (``epochs == 0``) stays off, and a quick run (``max_steps_per_epoch``
    set) runs the epochs given.
    """
    if epochs <= 0 or cfg.max_steps_per_epoch is not None:
        return epochs if epochs > 0 else 0
    return max(epochs, -(-cfg.min_steps // steps_per_epoch(cfg, n_train, world_size)))


def run_adaptation(source: nn.Module, data, cfg: AdaptConfig, desc: str = "adapt") -> tuple[nn.Module, dict]:
    """Adapt ``source`` to ``data`` with the iterative prune/recover schedule; returns the masked model and history."""
    from metaprune.data import BatchLoader
    from metaprune.engine import train
    from metaprune.engine.report import input_shape
    from metaprune.engine.runtime import get_world_size, resolve_device
    from spa.adapt import _NORMS, adapt_model
    from spa.gate import gate_step_keep
    from spa.masks import step_keep
    from spa.prune import apply_masks, build_graph, channel_groups, layer_masks

    device = resolve_device(cfg.device)
    model = adapt_model(source, cfg.method, _method_config(cfg), num_classes=data.num_classes, seed=cfg.seed)
    model.spa_norm_masks = {}
    model.to(device)
    shape = input_shape(model, data)
    dg = build_graph(model, torch.zeros(1, *shape, device=device))
    groups = channel_groups(model, dg, model.get_submodule(model.spa_head))
    n_train = len(data.train)
    world = max(get_world_size(), int(os.environ.get("WORLD_SIZE", "1")))
    warm = phase_epochs(cfg, cfg.warmup_epochs, n_train, world)
    rec = phase_epochs(cfg, cfg.recovery_epochs, n_train, world)
    per = steps_per_epoch(cfg, n_train, world)
    if (warm, rec) != (cfg.warmup_epochs, cfg.recovery_epochs):
        log.info("adapt: %d steps an epoch, so phases run %d warm-up / %d recovery epochs (at least %d steps each; "
                 "--min-steps)", per, warm, rec, cfg.min_steps)
    history: list[dict] = []
    if warm:
        res = train(model, data, _train_cfg(cfg, warm, cfg.seed), desc=f"{desc} warm-up")
        history.append({"phase": "warmup", "ratio": 0.0, "best_val_acc": res.best_val_acc, "epochs": res.history})
    if cfg.ratio > 0:
        mods = dict(model.named_modules())
        for k in range(1, cfg.steps + 1):
            r = cfg.ratio * k / cfg.steps
            gate = None
            if cfg.criterion == "gate":
                batches = BatchLoader(data.train, cfg.batch_size, shuffle=True, augment=False, seed=cfg.seed + k,
                                      device=device)  # the same batches on every process (masks from rank 0)
                keep, gate = gate_step_keep(model, groups, r, batches, cfg.gate_steps, PruneConfig.gate_lr,
                                            seed=cfg.seed + k, desc=f"{desc} gate {int(round(100 * r))}%")
            else:
                keep = step_keep(model, groups, r, criterion=cfg.criterion, seed=cfg.seed + k)
            lm = layer_masks(model, groups, keep)
            apply_masks(model, lm)
            model.spa_norm_masks = {n: d["out"] for n, d in lm.items() if isinstance(mods[n], _NORMS)}
            res = train(model, data, _train_cfg(cfg, rec, cfg.seed + k), desc=f"{desc} {int(round(100 * r))}% pruned")
            history.append({"phase": f"step {k}", "ratio": r, "best_val_acc": res.best_val_acc, "epochs": res.history,
                            **({"gate": gate} if gate is not None else {})})
    elif rec and not warm:
        res = train(model, data, _train_cfg(cfg, rec, cfg.seed), desc=desc)
        history.append({"phase": "train", "ratio": 0.0, "best_val_acc": res.best_val_acc, "epochs": res.history})
    model.eval()
    epochs = warm + (cfg.steps * rec if cfg.ratio > 0 else (rec if not warm else 0))
    return model, {"history": history, "groups": len(groups), "epochs": epochs, "steps_per_epoch": per,
                   "phase_epochs": {"warmup": warm, "recovery": rec}}


def adapt_task(source_path: str, task: str, output_dir: str | Path, config: AdaptConfig | None = None,
               progress_desc: str | None = None) -> AdaptResult:
    """Adapt the source model at ``source_path`` to ``task``; write the bundle and ``report.json`` to ``output_dir``.

    The report gives test accuracy of the masked adapted model and of the merged dense model, the
    learned parameters (paper's counting rule), bundle bytes vs the dense pruned model's bytes,
    params and MACs before and after.
    """
    from metaprune.engine.runtime import init_distributed, resolve_device
    from metaprune.io import check_output, load_model, state_dict_sha256
    from spa.bundle import WEIGHTS_NAME

    cfg = config or AdaptConfig()
    out = Path(output_dir)
    check_output(out / WEIGHTS_NAME, (source_path,))
    init_distributed(resolve_device(cfg.device))  # under torchrun: join before deciding who writes
    t0 = time.time()
    source, info_src = load_model(source_path)
    source.eval()
    src_hash = state_dict_sha256(source)
    data = load_task_data(task, cfg, source, info_src.extra)
    log.info("adapt: %s with %s (rank %d), %d%% of channels pruned", data.describe(), cfg.method, cfg.rank,
             round(100 * cfg.ratio))
    model, info = run_adaptation(source, data, cfg, desc=progress_desc or f"adapt {task}")
    # under torchrun every rank trained the same replica; rank 0 alone evaluates and writes
    report = None
    if is_main():
        report = _finish(model, source, source_path, src_hash, task, data, cfg, info, out, t0)
    barrier()
    report = broadcast_object(report)
    return AdaptResult(out, report, model)


def _finish(model: nn.Module, source: nn.Module, source_path: str, src_hash: str, task: str, data, cfg: AdaptConfig,
            info: dict, out: Path, t0: float) -> dict:
    """Evaluate, write the bundle and ``report.json`` (rank 0 only); returns the report."""
    from metaprune.engine import count_macs, count_params, evaluate
    from metaprune.engine.report import input_shape, write_report
    from metaprune.engine.runtime import resolve_device
    from metaprune.io import save_model
    from spa.adapt import learned_parameters
    from spa.bundle import WEIGHTS_NAME, merge, save_bundle

    device = resolve_device(cfg.device)
    shape = input_shape(model, data)
    masked_test = evaluate(model, data.test, device=device, desc="test")["acc"]
    learned = learned_parameters(model)
    save_bundle(model, out, method=cfg.method, method_config=_method_config(cfg), task=task,
                classes=list(getattr(data.train, "classes", None) or range(data.num_classes)),
                source_sha256=src_hash, input_shape=shape,
                extra={"source_path": str(source_path), "criterion": cfg.criterion})
    # the bundle's model (float16 values, folded statistics) is what the merged model computes
    merged = merge(out, source.cpu()).to(device)
    merged_test = evaluate(merged, data.test, device=device, desc="test (merged)")["acc"]
    with tempfile.TemporaryDirectory() as td:
        dense_path = save_model(merged.cpu(), Path(td) / "model.safetensors")
        dense_bytes = dense_path.stat().st_size
    bundle_bytes = sum(f.stat().st_size for f in (out / WEIGHTS_NAME, out / "adapter_config.json"))
    merged.cpu()
    report = {
        "command": "adapt", "task": task, "data": data.name, "source": str(source_path), "source_sha256": src_hash,
        "method": cfg.method, "rank": cfg.rank, "ratio": cfg.ratio, "criterion": cfg.criterion,
        "config": asdict(cfg),
        "test_acc": merged_test, "test_acc_masked": masked_test,
        "val_acc": info["history"][-1]["best_val_acc"] if info["history"] else None,
        "learned_params": learned, "bundle_bytes": bundle_bytes, "dense_pruned_bytes": dense_bytes,
        "bundle_to_dense": bundle_bytes / dense_bytes,
        "params": {"source": count_params(source), "pruned": count_params(merged)},
        "macs": {"source": count_macs(source.cpu(), shape), "pruned": count_macs(merged, shape)},
        "dependency_groups": info["groups"], "seconds": time.time() - t0, "history": info["history"],
        "epochs": info["epochs"], "phase_epochs": info["phase_epochs"], "steps_per_epoch": info["steps_per_epoch"],
        "train_images": len(data.train),
    }
    if cfg.latency:
        from metaprune.engine import measure_latency

        report["latency"] = {"source": measure_latency(source, shape), "pruned": measure_latency(merged, shape)}
    write_report(out, report)
    return report


_PRUNE_CLI_CARRY = ("seed", "device", "data_dir", "val_fraction", "train_subset", "batch_size", "max_steps_per_epoch",
                    "no_augment", "repeat_channels", "criterion", "gate_steps")


def adapt_tasks(source_path: str, tasks: list[str], method: str, ratio: float, output_dir: str | Path,
                args_namespace_or_config: AdaptConfig | argparse.Namespace | dict | None = None) -> list[AdaptResult]:
    """One pruned adapter bundle per task, in ``output_dir/<task>/`` (``metaprune prune --task …``).

    ``args_namespace_or_config`` is an :class:`AdaptConfig`, a dict whose matching names fill one
    (``epochs`` maps to ``recovery_epochs``), or the parsed options of ``metaprune prune``: of
    those only the data and runtime options carry over (seed, device, data folder, validation
    share, training subset, batch size, steps per epoch, augmentation, --repeat-channels, --criterion: one
    that adapt cannot use is refused) and ``--epochs N`` (N > 0)
    as the recovery epochs — prune's finetuning defaults (``--epochs 0``, ``--lr 0.01``,
    one-cycle) are not an adaptation schedule, so the rest of the schedule is
    :class:`AdaptConfig`'s default, exactly as ``metaprune adapt`` runs it. ``method`` and
    ``ratio`` given here win.
    """
    if not tasks:
        raise ConfigError("give at least one task (--task NAME; see `metaprune list-models --data`)")
    base = args_namespace_or_config
    if isinstance(base, AdaptConfig):
        cfg = AdaptConfig(**{**asdict(base), "method": method, "ratio": ratio})
    elif isinstance(base, argparse.Namespace):
        carry = {k: v for k, v in vars(base).items() if k in _PRUNE_CLI_CARRY}
        if (getattr(base, "epochs", None) or 0) > 0:
            carry["recovery_epochs"] = base.epochs
        cfg = AdaptConfig.from_namespace(carry, method=method, ratio=ratio)
    else:
        cfg = AdaptConfig.from_namespace(base or {}, method=method, ratio=ratio)
    results = []
    for task in tasks:
        name = task.replace("imagefolder:", "").rstrip("/").split("/")[-1] or "task"
        results.append(adapt_task(source_path, task, Path(output_dir) / name, cfg))
    return results
