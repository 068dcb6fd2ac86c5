"""High-level entry points: adapt one source model to one or many tasks, producing bundles.

``adapt_task(source_path, task, output_dir, config)`` trains the adapters of one task with
iterative pruning (criterion on the fused weights) and recovery epochs, selects on the task's
validation split, writes the bundle and ``report.json``. ``adapt_tasks`` does it for several
tasks (``output_dir/<task>/``), as used by ``metaprune prune --task A --task B``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from metaprune.errors import ConfigError

log = logging.getLogger("spa")


@dataclass
class AdaptConfig:
    """Options of :func:`adapt_task` (and of ``metaprune adapt``).

    Schedule: ``warmup_epochs`` of transfer training (adapters, norms, head; nothing pruned), then
    ``steps`` pruning steps that raise the pruned share of every dependency group linearly to
    ``ratio``, each followed by ``recovery_epochs`` of training. Total epochs
    ``warmup_epochs + steps * recovery_epochs``.
    """

    method: str = "splora"
    rank: int = 8
    ratio: float = 0.5
    steps: int = 3
    warmup_epochs: int = 1
    recovery_epochs: int = 1
    lr: float = 0.05
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
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio is the share of channels pruned and must be in [0, 1) (got {self.ratio})")
        if self.steps < 1 or self.warmup_epochs < 0 or self.recovery_epochs < 0:
            raise ConfigError("steps must be >= 1, warmup_epochs and recovery_epochs >= 0")
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


def load_task_data(task: str, cfg: AdaptConfig, source: nn.Module):
    """A task's splits (registered task, dataset, ``imagefolder:PATH``, ``synthetic``)."""
    from metaprune.data import load_dataset

    kw = {}
    args = getattr(source, "metaprune_arch", {}).get("args", {})
    if task == "synthetic" or task.startswith("imagefolder:"):
        kw = {"in_chans": args.get("in_chans"), "image_size": args.get("image_size") or 28}
        if task == "synthetic":
            kw["num_classes"] = 4
    data = load_dataset(task, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                        train_subset=cfg.train_subset, **kw)
    if args.get("in_chans") not in (None, data.in_chans):
        raise ConfigError(f"the source takes {args['in_chans']}-channel images but task {task} has {data.in_chans}")
    return data


def _train_cfg(cfg: AdaptConfig, epochs: int, seed: int):
    from metaprune.engine import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       schedule=cfg.schedule, augment=cfg.augment, seed=seed, device=cfg.device, resume=False,
                       max_steps_per_epoch=cfg.max_steps_per_epoch, amp=True)


def run_adaptation(source: nn.Module, data, cfg: AdaptConfig, desc: str = "adapt") -> tuple[nn.Module, dict]:
    """Adapt ``source`` to ``data`` with the iterative prune/recover schedule; returns the masked model and history."""
    from metaprune.engine import train
    from metaprune.engine.report import input_shape
    from metaprune.engine.runtime import resolve_device
    from spa.adapt import _NORMS, adapt_model
    from spa.masks import step_keep
    from spa.prune import apply_masks, build_graph, channel_groups, layer_masks

    device = resolve_device(cfg.device)
    model = adapt_model(source, cfg.method, _method_config(cfg), num_classes=data.num_classes, seed=cfg.seed)
    model.spa_norm_masks = {}
    model.to(device)
    shape = input_shape(model, data)
    dg = build_graph(model, torch.zeros(1, *shape, device=device))
    groups = channel_groups(model, dg, model.get_submodule(model.spa_head))
    history: list[dict] = []
    if cfg.warmup_epochs:
        res = train(model, data, _train_cfg(cfg, cfg.warmup_epochs, cfg.seed), desc=f"{desc} warm-up")
        history.append({"phase": "warmup", "ratio": 0.0, "best_val_acc": res.best_val_acc, "epochs": res.history})
    if cfg.ratio > 0:
        mods = dict(model.named_modules())
        for k in range(1, cfg.steps + 1):
            r = cfg.ratio * k / cfg.steps
            keep = step_keep(model, groups, r)
            lm = layer_masks(model, groups, keep)
            apply_masks(model, lm)
            model.spa_norm_masks = {n: d["out"] for n, d in lm.items() if isinstance(mods[n], _NORMS)}
            res = train(model, data, _train_cfg(cfg, cfg.recovery_epochs, cfg.seed + k),
                        desc=f"{desc} {int(round(100 * r))}% pruned")
            history.append({"phase": f"step {k}", "ratio": r, "best_val_acc": res.best_val_acc, "epochs": res.history})
    elif cfg.recovery_epochs and not cfg.warmup_epochs:
        res = train(model, data, _train_cfg(cfg, cfg.recovery_epochs, cfg.seed), desc=desc)
        history.append({"phase": "train", "ratio": 0.0, "best_val_acc": res.best_val_acc, "epochs": res.history})
    model.eval()
    return model, {"history": history, "groups": len(groups)}


def adapt_task(source_path: str, task: str, output_dir: str | Path, config: AdaptConfig | None = None,
               progress_desc: str | None = None) -> AdaptResult:
    """Adapt the source model at ``source_path`` to ``task``; write the bundle and ``report.json`` to ``output_dir``.

    The report gives test accuracy of the masked adapted model and of the merged dense model, the
    learned parameters (paper's counting rule), bundle bytes vs the dense pruned model's bytes,
    params and MACs before and after.
    """
    from metaprune.engine import count_macs, count_params, evaluate
    from metaprune.engine.report import input_shape, write_report
    from metaprune.engine.runtime import resolve_device
    from metaprune.io import check_output, load_model, save_model, state_dict_sha256
    from spa.adapt import learned_parameters
    from spa.bundle import WEIGHTS_NAME, merge, save_bundle

    cfg = config or AdaptConfig()
    out = Path(output_dir)
    check_output(out / WEIGHTS_NAME, (source_path,))
    t0 = time.time()
    source, _info = load_model(source_path)
    source.eval()
    src_hash = state_dict_sha256(source)
    data = load_task_data(task, cfg, source)
    log.info("adapt: %s with %s (rank %d), %d%% of channels pruned", data.describe(), cfg.method, cfg.rank,
             round(100 * cfg.ratio))
    model, info = run_adaptation(source, data, cfg, desc=progress_desc or f"adapt {task}")
    device = resolve_device(cfg.device)
    shape = input_shape(model, data)
    masked_test = evaluate(model, data.test, device=device, desc="test")["acc"]
    learned = learned_parameters(model)
    save_bundle(model, out, method=cfg.method, method_config=_method_config(cfg), task=task,
                classes=list(getattr(data.train, "classes", None) or range(data.num_classes)),
                source_sha256=src_hash, input_shape=shape, extra={"source_path": str(source_path)})
    merged = merge(out, source.cpu()).to(device)
    merged_test = evaluate(merged, data.test, device=device, desc="test (merged)")["acc"]
    with tempfile.TemporaryDirectory() as td:
        dense_path = save_model(merged.cpu(), Path(td) / "model.safetensors")
        dense_bytes = dense_path.stat().st_size
    bundle_bytes = sum(f.stat().st_size for f in (out / WEIGHTS_NAME, out / "adapter_config.json"))
    merged.cpu()
    report = {
        "command": "adapt", "task": task, "data": data.name, "source": str(source_path), "source_sha256": src_hash,
        "method": cfg.method, "rank": cfg.rank, "ratio": cfg.ratio, "config": asdict(cfg),
        "test_acc": merged_test, "test_acc_masked": masked_test,
        "val_acc": info["history"][-1]["best_val_acc"] if info["history"] else None,
        "learned_params": learned, "bundle_bytes": bundle_bytes, "dense_pruned_bytes": dense_bytes,
        "bundle_to_dense": bundle_bytes / dense_bytes,
        "params": {"source": count_params(source), "pruned": count_params(merged)},
        "macs": {"source": count_macs(source.cpu(), shape), "pruned": count_macs(merged, shape)},
        "dependency_groups": info["groups"], "seconds": time.time() - t0, "history": info["history"],
        "epochs": cfg.warmup_epochs + (cfg.steps * cfg.recovery_epochs if cfg.ratio > 0 else 0),
    }
    if cfg.latency:
        from metaprune.engine import measure_latency

        report["latency"] = {"source": measure_latency(source, shape), "pruned": measure_latency(merged, shape)}
    write_report(out, report)
    return AdaptResult(out, report, model)


def adapt_tasks(source_path: str, tasks: list[str], method: str, ratio: float, output_dir: str | Path,
                args_namespace_or_config: AdaptConfig | argparse.Namespace | dict | None = None) -> list[AdaptResult]:
    """One pruned adapter bundle per task, in ``output_dir/<task>/`` (``metaprune prune --task …``).

    ``args_namespace_or_config`` is an :class:`AdaptConfig`, or parsed CLI options / a dict whose
    matching names fill one (``epochs`` maps to ``recovery_epochs``); ``method`` and ``ratio``
    given here win.
    """
    if not tasks:
        raise ConfigError("give at least one task (--task NAME; see `metaprune list-models --data`)")
    base = args_namespace_or_config
    if isinstance(base, AdaptConfig):
        cfg = AdaptConfig(**{**asdict(base), "method": method, "ratio": ratio})
    else:
        cfg = AdaptConfig.from_namespace(base or {}, method=method, ratio=ratio)
    results = []
    for task in tasks:
        name = task.replace("imagefolder:", "").rstrip("/").split("/")[-1] or "task"
        results.append(adapt_task(source_path, task, Path(output_dir) / name, cfg))
    return results
