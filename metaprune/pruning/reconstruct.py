"""Prune-time reconstruction: refit the layers that read pruned channels so they match the unpruned network.

After torch-pruning removed channels, every conv / linear layer whose *input* lost channels (the consumers
of the pruned groups) is refitted in forward order, one after another: on a few calibration batches its
input in the pruned network (with the earlier layers already refitted) is regressed onto its output in
the unpruned network (only the output channels it kept), by ridge-regularised least squares on the
unfolded input patches (convs) or the input rows (linear layers):

    W = argmin ||X W - Y||^2 + lam ||W||^2,   lam = ridge * mean(diag(X^T X))

(the bias, if the layer has one, is fitted with it). A layer keeps its old weights if the fit does not
lower its output error. The pruned network runs with BatchNorm on batch statistics while inputs are
collected (what recalibration will give it); the refitted layer's output matches the unpruned one
*before* its BatchNorm, so that BatchNorm stays consistent. Finally BatchNorm statistics are
re-estimated on the same batches.

Which channels were kept is read from torch-pruning's pruning history, which
:func:`metaprune.pruning.engine.prune_once` records on the pruned model and which is replayed here on a
copy of the unpruned model.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from metaprune.errors import PruningError
from metaprune.pruning.criteria import HISTORY_ATTR
from metaprune.pruning.gate import clear_scores
from metaprune.pruning.structure import unwrapped_parameters


class _Stop(Exception):
    pass


def _size(layer: nn.Module, direction: str) -> int | None:
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels if direction == "out" else layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features if direction == "out" else layer.in_features
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return layer.num_features
    return None


def _bare_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    clear_scores(m)
    return m


def kept_channels(original: nn.Module, history: list, example_input: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """``{(layer name, "out" | "in"): original indices kept}`` for every conv / linear / BN layer the
    pruning ``history`` (torch-pruning's ``[root name, is_out, idxs]`` entries) touched."""
    m = _bare_copy(original).eval()
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=example_input,
                                                   unwrapped_parameters=unwrapped_parameters(m))
    modules = dict(m.named_modules())
    names = {mod: n for n, mod in modules.items()}
    alive: dict[tuple[str, str], torch.Tensor] = {}
    for name, is_out, idxs in history:
        if name not in modules:
            raise PruningError(f"pruning history names layer {name!r}, which the unpruned model lacks")
        layer = modules[name]
        pr = dg.get_pruner_of_module(layer)
        fn = pr.prune_out_channels if is_out else pr.prune_in_channels
        group = dg.get_pruning_group(layer, fn, list(idxs))
        for item in group:
            lay = item.dep.target.module
            n = names.get(lay)
            d = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if n is None or _size(lay, d) is None:
                continue
            cur = alive.get((n, d))
            if cur is None:
                cur = torch.arange(_size(lay, d))
            keep = torch.ones(len(cur), dtype=torch.bool)
            keep[torch.as_tensor(list(item.idxs), dtype=torch.long)] = False
            alive[(n, d)] = cur[keep]
        group.prune()
    return alive


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, output: bool) -> torch.Tensor:
    """``layer``'s input (``output=False``) or output in ``model(x)``; the forward stops right there."""
    box = {}

    def grab(t):
        box["t"] = t.detach()
        raise _Stop

    if output:
        h = layer.register_forward_hook(lambda mod, args, out: grab(out))
    else:
        h = layer.register_forward_pre_hook(lambda mod, args: grab(args[0]))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return box["t"]


def _rows(layer: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Design matrix (one row per output position) and targets of ``layer``."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N, K, P
        X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        Y = None if y is None else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        X = x.reshape(-1, x.shape[-1])
        Y = None if y is None else y.reshape(-1, y.shape[-1])
    if layer.bias is not None:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)
    return X, Y


CHUNK_ELEMENTS = 1 << 24  # design-matrix elements per chunk (128 MB in float64)


def _chunks(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` split along the batch so that one chunk's design matrix holds at most ~``CHUNK_ELEMENTS``
    (a VGG-16 layer at 224 px has 50,176 rows of 577 columns per image: a whole batch of 128 as one
    float64 matrix would take 30 GB). Summing the chunks' normal equations gives the same fit."""
    if isinstance(layer, nn.Conv2d):
        k = layer.in_channels // layer.groups * math.prod(layer.kernel_size) + 1
        per_sample = math.prod(y.shape[2:]) * k
    else:
        per_sample = math.prod(x.shape[1:-1]) * (x.shape[-1] + 1)
    n = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for i in range(0, len(x), n):
        yield x[i:i + n], y[i:i + n]


def _weight_matrix(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach()[:, None]], 1)
    return w.t().double()  # K (+1), out


def _sq_err(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, yy: float) -> float:
    """``||X w - Y||^2`` from ``A = X^T X``, ``B = X^T Y``, ``yy = ||Y||^2``."""
    return float((w * (A @ w)).sum() - 2 * (w * B).sum()) + yy


@torch.no_grad()
def recalibrate_bn_batches(model: nn.Module, xs: Iterable[torch.Tensor], limit: int | None = None) -> int:
    """Re-estimate BatchNorm running statistics as the cumulative average over the inputs ``xs``
    (train-mode forward, at most ``limit`` batches). Returns the batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or (limit is not None and limit <= 0):
        return 0
    it = iter(xs)
    first = next(it, None)
    if first is None:  # no data: keep the statistics as they are
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    n = 0
    for x in itertools.chain([first], it):
        if limit is not None and n >= limit:
            break
        model(x)
        n += 1
    for m, mom in saved:
        m.momentum = mom
    model.train(was)
    return n


@torch.no_grad()
def reconstruct(original: nn.Module, pruned: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                max_batches: int = 8, example_input: torch.Tensor | None = None, ridge: float = 1e-3,
                recalibrate: bool = True, history: list | None = None) -> dict:
    """Refit, in place, the consumers of ``pruned``'s pruned groups to match ``original`` (see the module doc).

    Args:
        original: the unpruned model (left untouched).
        pruned: a model pruned from ``original`` by :func:`metaprune.pruning.prune` (which calls this itself
            with ``PruneConfig(reconstruct=True)``) or :func:`prune_once` (which records its history on it).
        history: torch-pruning's pruning history of ``pruned`` (``PruneResult.history``); default: the one
            recorded on ``pruned``.
        batches: calibration ``(x, y)`` batches (labels unused); the first ``max_batches`` are used.
        example_input: one input for tracing (default: the first calibration batch).
        ridge: relative ridge strength.
        recalibrate: re-estimate BatchNorm statistics on the batches afterwards.

    Returns ``{"layers", "batches", "seconds", "rel_err_before", "rel_err_after", "per_layer"}``; the errors are
    the mean relative output errors ``||XW - Y||^2 / ||Y||^2`` of the refitted layers on the batches.
    """
    t0 = time.perf_counter()
    history = getattr(pruned, HISTORY_ATTR, None) if history is None else history
    if history is None:
        raise PruningError("reconstruction needs the pruning history torch-pruning recorded on the pruned model; "
                           "prune with PruneConfig(reconstruct=True)")
    device = next(pruned.parameters()).device
    xs = []
    for x, _ in batches:
        if len(xs) >= max_batches:
            break
        xs.append(x.to(device))
    if not xs:
        raise PruningError("reconstruction got no calibration batches")
    ex = (xs[0] if example_input is None else example_input)[:1].to(device)
    orig = _bare_copy(original).to(device).eval()
    kept = kept_channels(orig, history, ex)
    pmods, omods = dict(pruned.named_modules()), dict(orig.named_modules())
    layers = [n for n, mod in pmods.items()
              if (n, "in") in kept and n in omods and ((isinstance(mod, nn.Conv2d) and mod.groups == 1
                                                         and mod.padding_mode == "zeros") or isinstance(mod, nn.Linear))]
    was = pruned.training
    bns = [m for m in pruned.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bn_saved = [(m, m.momentum) for m in bns]
    pruned.eval()
    for m in bns:  # batch statistics (what recalibration gives), running statistics untouched
        m.train()
        m.momentum = 0.0
    per_layer = {}
    try:
        from metaprune.engine.runtime import progress

        for name in progress(layers, desc="reconstruct", total=len(layers)):
            lay, olay = pmods[name], omods[name]
            out_idx = kept.get((name, "out"))
            A = B = None
            yy = 0.0
            for x in xs:
                xin = _capture(pruned, lay, x, output=False)
                y = _capture(orig, olay, x, output=True)
                if out_idx is not None:
                    y = y.index_select(1 if isinstance(lay, nn.Conv2d) else -1, out_idx.to(device))
                for xc, yc in _chunks(lay, xin, y):
                    X, Y = _rows(lay, xc, yc)
                    X, Y = X.double(), Y.double()
                    A = X.t() @ X if A is None else A + X.t() @ X
                    B = X.t() @ Y if B is None else B + X.t() @ Y
                    yy += float((Y * Y).sum())
            w0 = _weight_matrix(lay)
            if w0.shape[0] != A.shape[0] or w0.shape[1] != B.shape[1]:
                raise PruningError(f"reconstruction of {name}: shapes do not match ({tuple(w0.shape)} vs "
                                   f"{tuple(A.shape)}, {tuple(B.shape)}); this is a bug, please report it")

            lam = ridge * float(A.diagonal().mean()) + 1e-12
            w = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device), B)
            e0, e1 = _sq_err(w0, A, B, yy) / max(yy, 1e-12), _sq_err(w, A, B, yy) / max(yy, 1e-12)
            if e1 < e0 and torch.isfinite(w).all():
                w = w.t().to(lay.weight.dtype)
                if lay.bias is not None:
                    lay.bias.copy_(w[:, -1])
                    w = w[:, :-1]
                lay.weight.copy_(w.reshape(lay.weight.shape))
            else:
                e1 = e0
            per_layer[name] = {"rel_err_before": e0, "rel_err_after": e1}
    finally:
        for m, mom in bn_saved:
            m.momentum = mom
        pruned.train(was)
    if recalibrate:
        recalibrate_bn_batches(pruned, xs)
    n = max(1, len(per_layer))
    return {"layers": len(per_layer), "batches": len(xs), "seconds": round(time.perf_counter() - t0, 3),
            "rel_err_before": sum(v["rel_err_before"] for v in per_layer.values()) / n,
            "rel_err_after": sum(v["rel_err_after"] for v in per_layer.values()) / n, "per_layer": per_layer}
