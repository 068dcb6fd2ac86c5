"""Prunability: accuracy against MAC speed-up when a model is pruned without finetuning.

Each point prunes a fresh copy of the model to a channel ratio, recalibrates BatchNorm
statistics on a few training batches, and measures accuracy on the *validation* split. The
area under the accuracy / speed-up curve from 1x to ``max_speedup``, divided by the width of that
range, is the mean accuracy over it: a single comparable "prunability" score.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaprune.data.datasets import DataSplits
from metaprune.data.loader import BatchLoader
from metaprune.engine.evaluate import evaluate
from metaprune.engine.measure import count_macs
from metaprune.engine.runtime import resolve_device
from metaprune.errors import ConfigError
from metaprune.pruning.config import PruneConfig
from metaprune.pruning.criteria import accumulate_gradients
from metaprune.pruning.engine import prune_once
from metaprune.pruning.reconstruct import recalibrate_bn_batches


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset, batches: int = 8, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> int:
    """Re-estimate BatchNorm running statistics from ``batches`` un-augmented training batches
    (cumulative average, fixed order, so it is deterministic). Returns the batches used."""
    loader = BatchLoader(dataset, batch_size, shuffle=False, augment=False, device=device)
    return recalibrate_bn_batches(model, (x for x, _ in loader), limit=batches)


def _auc(speedups: list[float], accs: list[float], max_speedup: float, floor: float) -> float:
    """Mean accuracy over [1, max_speedup] of the piecewise-linear curve; beyond its last point the
    accuracy counts as ``floor`` (chance level)."""
    xs, ys = list(speedups), list(accs)
    if xs[-1] < max_speedup:
        xs += [xs[-1] * (1 + 1e-9), max_speedup]
        ys += [floor, floor]
    grid = np.linspace(1.0, max_speedup, 512)
    vals = np.interp(grid, np.maximum.accumulate(np.array(xs)), np.array(ys))
    return float(np.trapezoid(vals, grid) / (max_speedup - 1.0))


def check_curve_options(max_speedup: float, steps: int, val_batches: int | None = None, calib_batches: int = 0,
                        batch_size: int = 1) -> None:
    """Refuse curve options that cannot give a curve (``max_speedup`` must be a finite number > 1)."""
    if not (math.isfinite(max_speedup) and max_speedup > 1):
        raise ConfigError(f"--max-speedup {max_speedup} must be a finite number > 1 (the right end of the curve, "
                          "e.g. 3)")
    if steps < 1:
        raise ConfigError(f"--steps {steps} must be >= 1")
    if val_batches is not None and val_batches < 0:
        raise ConfigError(f"--val-batches {val_batches} must be >= 1 (or 0 for the whole validation split)")
    if calib_batches < 0:
        raise ConfigError(f"--calib-batches {calib_batches} must be >= 0 (0: no BatchNorm recalibration)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")


def prunability_curve(model: nn.Module, data: DataSplits, max_speedup: float = 3.0, steps: int = 6,
                      criterion: str = PruneConfig.criterion, val_batches: int | None = 8, calib_batches: int = 8,
                      batch_size: int = 256, device: str | torch.device = "auto", seed: int = 0,
                      global_pruning: bool = False, ignore: tuple[str, ...] = (), gate_steps: int = PruneConfig.gate_steps,
                      reconstruct: bool = False, reconstruct_batches: int = 8, metanet: str | None = None) -> dict:
    """Accuracy-vs-speed-up curve of ``model`` pruned without finetuning, and its normalised AUC.

    Args:
        model: an in-memory model (left untouched).
        data: its dataset; accuracy is measured on ``data.val`` (first ``val_batches`` batches,
            all if None), BatchNorm is recalibrated on the first ``calib_batches`` of ``data.train``.
        max_speedup: right end of the curve and of the AUC.
        steps: number of pruned points; channel ratios are spaced so the last one is expected to
            reach ``max_speedup`` (more points are added if it does not, up to a 90% ratio).
        criterion: channel importance (see :class:`PruneConfig`); ``gate`` is learned once (``gate_steps``
            batches of 128 of ``data.train``, removal ratios drawn over the curve's range) and ranks every point.
        metanet: score-metanetwork folder of ``criterion="metanet"`` (run once, its scores rank every point).
        reconstruct: refit each point's pruned consumers on ``reconstruct_batches`` training batches of 128
            (:mod:`metaprune.pruning.reconstruct`) before the BatchNorm recalibration.

    Returns:
        ``{"speedups", "accs", "ratios", "macs", "auc", "auc_rel", "base_acc", "max_speedup", ...}``;
        ``auc`` is the mean accuracy (%) over speed-ups 1..``max_speedup``, ``auc_rel`` the same
        divided by the unpruned accuracy. Deterministic for a given seed.
    """
    check_curve_options(max_speedup, steps, val_batches, calib_batches, batch_size)
    if not isinstance(reconstruct, bool):  # "auto" / "false" from a preset would be truthy
        raise ConfigError(f"curve's reconstruct must be true or false, not {reconstruct!r}")
    val_batches = val_batches or None  # 0: the whole validation split (as on the command line)
    device = resolve_device(device)  # the defaults are `metaprune curve`'s: auto = CUDA when present
    torch.manual_seed(seed)
    base = copy.deepcopy(model).to(device).eval()
    shape = (data.in_chans, data.image_size, data.image_size)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    macs0 = count_macs(base, shape)
    ev = dict(batch_size=batch_size, device=device, max_batches=val_batches, desc="curve")
    base_acc = evaluate(base, data.val, **ev)["acc"]
    grads = False
    if criterion == "taylor":
        calib = BatchLoader(data.train, batch_size, shuffle=False, augment=False, device=device)
        grads = accumulate_gradients(base, calib, calib_batches) > 0
    cfg = PruneConfig(ratio=0.5, criterion=criterion, global_pruning=global_pruning, ignore=tuple(ignore), seed=seed,
                      gate_steps=gate_steps, metanet=metanet)
    p_end = min(0.9, 1 - max_speedup ** -0.5)
    ratios = [p_end * (k + 1) / steps for k in range(steps)]
    extra: dict = {"reconstruct": bool(reconstruct)}
    fit_batches = BatchLoader(data.train, 128, shuffle=True, augment=False, seed=seed, device=device)
    if criterion == "gate":  # one ranking for the whole curve
        from metaprune.pruning.gate import learn_gate_scores

        extra["gate"] = learn_gate_scores(base, cfg, x, fit_batches, ratio_range=(0.5 * p_end / steps, p_end))
    if criterion == "metanet":  # one metanetwork pass for the whole curve
        from metaprune.metanet.rank import attach_metanet_scores

        extra["metanet"] = attach_metanet_scores(base, metanet, cfg, x)
    out = {"speedups": [1.0], "accs": [base_acc], "ratios": [0.0], "macs": [macs0]}
    i = 0
    while i < len(ratios):
        r = ratios[i]
        m = prune_once(copy.deepcopy(base), cfg, r, x, grads_ready=grads)
        if reconstruct:
            from metaprune.pruning.reconstruct import reconstruct as refit

            refit(base, m, fit_batches, reconstruct_batches, x, recalibrate=False)
        macs = count_macs(m, shape)
        recalibrate_bn(m, data.train, calib_batches, batch_size, device)
        acc = evaluate(m, data.val, **ev)["acc"]
        out["speedups"].append(macs0 / macs)
        out["accs"].append(acc)
        out["ratios"].append(r)
        out["macs"].append(macs)
        if i == len(ratios) - 1 and macs0 / macs < max_speedup and r < 0.9 - 1e-6:
            ratios.append(min(0.9, r + p_end / steps))
        i += 1
    floor = 100.0 / data.num_classes
    auc = _auc(out["speedups"], out["accs"], max_speedup, floor)
    out.update(auc=auc, auc_rel=auc / base_acc if base_acc > 0 else math.nan, base_acc=base_acc,
               max_speedup=max_speedup, criterion=criterion, val_batches=val_batches,
               calib_batches=calib_batches, chance_acc=floor, split="val", **extra)
    base.zero_grad(set_to_none=True)
    return out


def plot_curve(curve: dict, path: str | Path, title: str = "") -> Path:
    """Write one accuracy / speed-up curve as a PNG (matplotlib Agg), atomically."""
    label = f"no finetuning ({curve['criterion']})"
    return plot_curves({label: curve}, path,
                       title or f"prunability AUC {curve['auc']:.1f}% (to {curve['max_speedup']:g}x)")


def plot_curves(curves: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Write several accuracy / speed-up curves (e.g. original vs edited) into one PNG, atomically.

    ``curves`` maps a legend label to a :func:`prunability_curve` result; the AUC is added to the label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaprune.io import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for (label, c), marker in zip(curves.items(), "os^vD<>"):
        ax.plot(c["speedups"], c["accs"], f"{marker}-", label=f"{label} (AUC {c['auc']:.1f})")
    first = next(iter(curves.values()))
    if "chance_acc" in first:
        ax.axhline(first["chance_acc"], color="grey", lw=0.8, ls=":", label="chance")
    if "max_speedup" in first:
        ax.axvline(first["max_speedup"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MAC speed-up (x), no finetuning, BN recalibrated")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
