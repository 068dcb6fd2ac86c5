"""Training and finetuning: SGD with cosine / step / one-cycle schedules, AMP (bf16 on CUDA),
DDP under torchrun, resumable checkpoints, best-epoch selection on the validation split."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from metaprune.data.datasets import DataSplits
from metaprune.data.loader import BatchLoader
from metaprune.engine.evaluate import evaluate
from metaprune.engine.runtime import (
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    progress,
    resolve_device,
    seed_everything,
)
from metaprune.errors import ConfigError, ModelFileError

LAST_CKPT = "last.pt"


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

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs must be >= 0, batch_size >= 1 and lr > 0")
        if self.schedule not in ("cosine", "step", "onecycle", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; use cosine, step, onecycle or constant")
        if self.sparse_reg < 0:
            raise ConfigError("--sparse-reg must be >= 0")


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
    """SGD with weight decay on weights only (not on biases or norm parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _save_resume(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(model: nn.Module, data: DataSplits, cfg: TrainConfig, out_dir: str | Path | None = None,
          regularizer: Regularizer | None = None, desc: str = "train") -> TrainResult:
    """Train ``model`` on ``data.train``, select the best epoch on ``data.val``, return it.

    With ``out_dir``, a resume checkpoint (``last.pt``, tensors and plain values only, loaded with
    ``weights_only=True``) is written after every epoch and picked up by a rerun. Under torchrun
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
    if ckpt is not None and cfg.resume and ckpt.exists():
        try:
            st = torch.load(ckpt, map_location=device, weights_only=True)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except Exception as e:  # noqa: BLE001
            raise ModelFileError(f"{ckpt} is a resume checkpoint of a different run or is damaged ({e}); "
                                 "delete it or choose another output folder") from None
        start_epoch, history = int(st["epoch"]) + 1, list(st["history"])
        best = {"epoch": int(st["best_epoch"]), "acc": float(st["best_acc"]), "state": st["best_state"]}
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if regularizer is not None:
                regularizer.after_backward(model)
            opt.step()
            step += 1
            run_loss += loss.item() * len(y)
            run_n += len(y)
            correct += (out.argmax(1) == y).sum().item()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{100 * correct / run_n:.1f}")
        v = evaluate(model, data.val, cfg.eval_batch_size, device, amp=amp, sharded=distributed, desc="val")
        rec = {"epoch": epoch, "train_loss": run_loss / max(1, run_n), "train_acc": 100 * correct / max(1, run_n),
               "val_acc": v["acc"], "val_loss": v["loss"], "lr": opt.param_groups[0]["lr"]}
        history.append(rec)
        if v["acc"] > best["acc"]:
            best = {"epoch": epoch, "acc": v["acc"], "state": copy.deepcopy(model.state_dict())}
        if ckpt is not None and is_main():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_resume(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                "history": history, "best_epoch": best["epoch"], "best_acc": best["acc"],
                                "best_state": best["state"], "config": asdict(cfg)})
        barrier()
    model.load_state_dict(best["state"])
    model.eval()
    return TrainResult(model, best["epoch"], best["acc"], history, time.time() - t0)
