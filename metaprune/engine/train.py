"""Training and finetuning: SGD (or AdamW) with cosine / step / one-cycle schedules, AMP (bf16 on CUDA),
DDP under torchrun, resumable checkpoints, best-epoch selection on the validation split."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from metaprune.data.datasets import DataSplits
from metaprune.data.loader import BatchLoader
from metaprune.engine.evaluate import evaluate
from metaprune.engine.runtime import (
    any_process,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    progress,
    resolve_device,
    seed_everything,
)
from metaprune.errors import ConfigError, ModelFileError, TrainingError
from metaprune.fingerprint import (
    all_finite,
    check_bool,
    check_float,
    check_int,
    check_resume,
    data_identity,
    dumps,
    model_identity,
)

LAST_CKPT = "last.pt"
#: optimizers of :class:`TrainConfig` (AdamW: ``momentum`` is its beta1)
OPTIMIZERS = ("sgd", "adamw")
# options that do not change what a run computes: a resume may differ in them
VOLATILE = ("resume", "device", "amp", "eval_batch_size")
# options added after runs existed: left out of a run's identity at their default, so earlier runs (whose
# files lack them) keep their identity
OMIT_AT_DEFAULT = {"optimizer": "sgd"}


def identity_options(options: dict) -> dict:
    """The training options (a :class:`TrainConfig` as a dict, or one read back from a file) that decide what a
    run computes: all but :data:`VOLATILE` and the :data:`OMIT_AT_DEFAULT` options at their default."""
    return {k: v for k, v in options.items()
            if k not in VOLATILE and not (k in OMIT_AT_DEFAULT and OMIT_AT_DEFAULT[k] == v)}


@dataclass
class TrainConfig:
    """Options of :func:`train` (and of ``metaprune train`` / ``finetune``)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "onecycle"
    milestones: tuple[float, ...] = (0.5, 0.75)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    flip: bool = True
    amp: bool = True
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 512
    max_steps_per_epoch: int | None = None
    resume: bool = True
    sparse_reg: float = 0.0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("seed", self.seed)
        check_int("max_steps_per_epoch", self.max_steps_per_epoch, 1, optional=True)
        check_float("lr", self.lr, above=0)
        check_float("momentum", self.momentum, minimum=0, below=1)
        check_float("weight_decay", self.weight_decay, minimum=0)
        check_float("warmup_epochs", self.warmup_epochs, minimum=0)
        check_float("label_smoothing", self.label_smoothing, minimum=0, below=1)
        check_float("sparse_reg", self.sparse_reg, minimum=0)
        for f in ("nesterov", "augment", "flip", "amp", "resume"):
            check_bool(f, getattr(self, f))
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; use {' or '.join(OPTIMIZERS)} (adamw suits ViTs, "
                              "e.g. --optimizer adamw --lr 1e-3 --weight-decay 0.05)")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.schedule, str) or self.schedule not in ("cosine", "step", "onecycle", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; use cosine, step, onecycle or constant")
        if not isinstance(self.milestones, (list, tuple)):
            raise ConfigError(f"milestones must be a list of fractions of the run, got {self.milestones!r}")
        self.milestones = tuple(self.milestones)
        for m in self.milestones:
            check_float("each milestone", m, minimum=0, maximum=1)

    def identity(self) -> dict:
        """The options that decide what a run computes (what a resume must agree on)."""
        d = identity_options({f.name: getattr(self, f.name) for f in fields(self)})
        if self.schedule == "constant" and self.warmup_epochs == 0:
            d.pop("epochs")  # a constant learning rate: a longer run continues the shorter one exactly
        return d


class Regularizer(Protocol):
    """Hook for sparsity training: called every epoch and between ``backward()`` and ``step()``."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...

    def after_backward(self, model: nn.Module) -> None: ...


@dataclass
class TrainResult:
    """What :func:`train` returns: the best model (by validation accuracy) and the run's history."""

    model: nn.Module
    best_epoch: int
    best_val_acc: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    t = step / max(1, total)
    if cfg.schedule == "onecycle":
        warm = 0.15
        if t < warm:
            return cfg.lr * (0.04 + 0.96 * t / warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm))) + 1e-6
    warm = cfg.warmup_epochs / max(1, cfg.epochs)
    if t < warm:
        return cfg.lr * t / warm
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * 0.1 ** sum(t >= m for m in cfg.milestones)
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW (beta1 = ``momentum``), weight decay on weights only (not on biases
    or norm parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _save_resume(path: Path, state: dict) -> None:
    from metaprune.io import atomic_path

    with atomic_path(path, track=False) as tmp:  # a crash (or kill -9) leaves the previous checkpoint intact; kept when the command fails later (resume)
        torch.save(state, tmp)


def drop_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete what a process killed while writing into ``folder`` left behind (the ``.NAME.*.tmp``
    files of :func:`metaprune.io.atomic_path` for each of ``names``: a checkpoint and the outputs
    written beside it)."""
    if folder.is_dir():
        for name in names:
            for f in folder.glob(f".{name}.*.tmp"):
                f.unlink(missing_ok=True)


def run_fingerprint(model: nn.Module, data: DataSplits, cfg: TrainConfig, identity: dict | None = None) -> dict:
    """What a resume checkpoint of :func:`train` must match: the config (less :data:`VOLATILE`),
    the architecture and widths, the dataset, and the starting point (``identity``, e.g. the source
    file's hash; by default the SHA-256 of the incoming weights)."""
    from metaprune.io import state_dict_sha256

    start = identity if identity is not None else {"weights_sha256": state_dict_sha256(model)}
    return {"kind": "train", "config": cfg.identity(), "model": model_identity(model), "data": data_identity(data),
            "start": start}


def train(model: nn.Module, data: DataSplits, cfg: TrainConfig, out_dir: str | Path | None = None,
          regularizer: Regularizer | None = None, desc: str = "train", identity: dict | None = None) -> TrainResult:
    """Train ``model`` on ``data.train``, select the best epoch on ``data.val``, return it.

    With ``out_dir``, a resume checkpoint (``last.pt``, tensors and plain values only, loaded with
    ``weights_only=True``) is written after every epoch and picked up by a rerun of the *same* run:
    the checkpoint holds the run's fingerprint (:func:`run_fingerprint`; ``identity`` names the
    starting point, by default the hash of the incoming weights) and a rerun whose fingerprint
    differs is refused with a :class:`~metaprune.errors.ConfigError` naming what differs
    (``cfg.resume=False`` starts afresh and replaces it). A loss or weights that become NaN or
    infinite stop the run with :class:`~metaprune.errors.TrainingError`. Under torchrun
    the model is wrapped in DistributedDataParallel and the data sharded; only rank 0 writes.
    The test split is never looked at here.
    """
    device = resolve_device(cfg.device)
    distributed = init_distributed(device)
    seed_everything(cfg.seed + get_rank())
    model.to(device)
    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = cfg.amp and device.type == "cuda"
    loader = BatchLoader(data.train, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed,
                         rank=get_rank(), world_size=get_world_size(), device=device, drop_last=len(data.train) > cfg.batch_size * get_world_size(),
                         num_workers=4 if device.type == "cuda" else 0, flip=cfg.flip)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total = max(1, steps_per_epoch * cfg.epochs)
    opt = make_optimizer(model, cfg)
    start_epoch, history = 0, []
    best = {"epoch": -1, "acc": -1.0, "state": None}
    ckpt = Path(out_dir) / LAST_CKPT if out_dir is not None else None
    fp = run_fingerprint(model, data, cfg, identity) if ckpt is not None else None
    if not all_finite(model.state_dict().values()):
        raise TrainingError(f"{desc}: the model to train holds NaN or infinite weights; start from a finite model")
    if ckpt is not None and is_main():
        drop_stale_temporaries(ckpt.parent, (ckpt.name, "model.safetensors", "report.json", "metrics.json"))
    if ckpt is not None and cfg.resume and ckpt.exists():
        try:
            st = torch.load(ckpt, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{ckpt} is not a readable resume checkpoint ({str(e)[:200]}); pass --no-resume "
                                 "to start afresh or choose another output folder") from None
        check_resume(ckpt, st.get("fingerprint") if isinstance(st, dict) else None, fp, f"{desc} run")
        try:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            start_epoch, history = int(st["epoch"]) + 1, list(st["history"])
            best = {"epoch": int(st["best_epoch"]), "acc": float(st["best_acc"]), "state": st["best_state"]}
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{ckpt} is damaged ({str(e)[:200]}); pass --no-resume to start afresh") from None
        if start_epoch > cfg.epochs:
            raise ConfigError(f"{ckpt} is a checkpoint after epoch {start_epoch} of a run that asked for more epochs "
                              f"than --epochs {cfg.epochs}; pass --no-resume to start afresh or use another folder")
        if not distributed and isinstance(st.get("rng"), torch.Tensor):  # bit-exact continuation
            torch.set_rng_state(st["rng"].cpu())
            if device.type == "cuda" and isinstance(st.get("cuda_rng"), torch.Tensor):
                torch.cuda.set_rng_state(st["cuda_rng"].cpu(), device)
    if best["state"] is None:  # epoch -1 = the incoming weights: training never returns a worse model
        v = evaluate(model, data.val, cfg.eval_batch_size, device, amp=amp, sharded=distributed, desc="val")
        best = {"epoch": -1, "acc": v["acc"], "state": copy.deepcopy(model.state_dict())}
    t0 = time.time()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        loader.set_epoch(epoch)
        if regularizer is not None:
            regularizer.on_epoch_start(model, epoch)
        run_loss, run_n, correct = 0.0, 0, 0
        bar = progress(loader, f"{desc} {epoch + 1}/{cfg.epochs}", total=steps_per_epoch)
        for i, (x, y) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            lv = loss.item()
            if any_process(not math.isfinite(lv), device, distributed):
                raise TrainingError(f"{desc}: the loss became {lv} at epoch {epoch + 1}, step {i + 1} (learning rate "
                                    f"{opt.param_groups[0]['lr']:.3g}); nothing was saved as the result. Lower --lr "
                                    "(or --weight-decay), or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if regularizer is not None:
                regularizer.after_backward(model)
            opt.step()
            step += 1
            run_loss += lv * len(y)
            run_n += len(y)
            correct += (out.argmax(1) == y).sum().item()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{100 * correct / run_n:.1f}")
        if any_process(not all_finite(model.state_dict().values()), device, distributed):
            raise TrainingError(f"{desc}: the weights became NaN or infinite in epoch {epoch + 1}; nothing was saved "
                                "as the result. Lower --lr (or --weight-decay)")
        v = evaluate(model, data.val, cfg.eval_batch_size, device, amp=amp, sharded=distributed, desc="val")
        if len(data.val) and not math.isfinite(v["loss"]):  # the same value on every rank (sharded evaluate)
            raise TrainingError(f"{desc}: the validation loss became {v['loss']} after epoch {epoch + 1} (the weights "
                                "diverged); nothing was saved as the result. Lower --lr (or --weight-decay)")
        rec = {"epoch": epoch, "train_loss": run_loss / max(1, run_n), "train_acc": 100 * correct / max(1, run_n),
               "val_acc": v["acc"], "val_loss": v["loss"], "lr": opt.param_groups[0]["lr"]}
        history.append(rec)
        if v["acc"] > best["acc"]:
            best = {"epoch": epoch, "acc": v["acc"], "state": copy.deepcopy(model.state_dict())}
        if ckpt is not None and is_main():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "history": history, "best_epoch": best["epoch"], "best_acc": best["acc"],
                     "best_state": best["state"], "config": asdict(cfg), "fingerprint": dumps(fp),
                     "rng": torch.get_rng_state()}
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            _save_resume(ckpt, state)
        barrier()
    model.load_state_dict(best["state"])
    model.eval()
    return TrainResult(model, best["epoch"], best["acc"], history, time.time() - t0)
