"""Structured pruning with torch-pruning's DepGraph: a channel ratio, or a MAC / parameter target
reached by searching the ratio. Whole attention heads are removed from ViTs."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch_pruning as tp
from torch import nn

from metaprune.engine.measure import count_macs, count_params
from metaprune.errors import PruningError
from metaprune.models import get_widths
from metaprune.pruning import rounding
from metaprune.pruning.config import PruneConfig
from metaprune.pruning.criteria import (
    HISTORY_ATTR,
    ScoreImportance,
    accumulate_gradients,
    check_criterion,
    make_importance,
    record_history,
)
from metaprune.pruning.structure import (
    attention_layers,
    call,
    channel_groups,
    check_outputs,
    customized_pruners,
    dependency_graph,
    first_sample,
    graph_kwargs,
    ignored_layers,
    output_layers,
    output_signature,
    resolve_ignored,
    sync_attributes,
    traceable,
)

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """A pruned model and what was achieved.

    ``speedup`` and ``params_reduction`` are base / pruned (MACs per image, parameter count);
    ``ratio`` is the share of channels that was actually removed, measured on the pruned model
    (over the layers the target applies to: not the classifier, ``ignore`` or layers tied to them),
    and ``layer_ratios`` the same per layer; ``uniform_ratio`` is the per-group ratio the uniform stage
    applied and ``refine_ratio`` the global ratio of the refine stage (None when it did not run).
    ``criterion`` is the ranking used in every stage. ``target_met`` compares measured values with the
    target: a speed-up / params target within the tolerance; a channel ratio reached within the
    tolerance (less is reported, with ``notes`` naming the layers that could not be pruned).
    """

    model: nn.Module
    ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    heads_before: list[int] = field(default_factory=list)
    heads_after: list[int] = field(default_factory=list)
    target: tuple[str, float] = ("ratio", 0.0)
    target_met: bool = True
    trials: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # e.g. {"gate": {...seconds...}, "reconstruct": {...}}
    history: list = field(default_factory=list, repr=False)  # torch-pruning's [root, is_out, idxs] (reconstruct)
    uniform_ratio: float | None = None
    refine_ratio: float | None = None
    layer_ratios: dict[str, float] = field(default_factory=dict)
    criterion: str = ""

    @property
    def speedup(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    @property
    def params_reduction(self) -> float:
        return self.params_before / max(1, self.params_after)

    def summary(self) -> dict:
        """JSON-ready description (no model)."""
        return {"ratio": self.ratio, "uniform_ratio": self.uniform_ratio, "refine_ratio": self.refine_ratio,
                "criterion": self.criterion, "layer_ratios": self.layer_ratios, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "speedup": self.speedup, "params_reduction": self.params_reduction,
                "heads_before": self.heads_before, "heads_after": self.heads_after,
                "target": {"kind": self.target[0], "value": self.target[1]}, "target_met": self.target_met,
                "search": self.trials, "notes": self.notes, **self.info}


def _example(model: nn.Module, example_input: torch.Tensor | None, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    if example_input is None:
        if input_shape is None:
            from metaprune.engine.report import input_shape as default_shape

            input_shape = default_shape(model)
        example_input = torch.randn(1, *input_shape)
    device = next(model.parameters()).device
    return first_sample(example_input, device)  # a tensor, or a tuple / dict of them (torch-pruning's convention)


def _macs(model: nn.Module, shape) -> int:
    """MACs per image: ``shape`` is the per-sample input shape, or the example input itself when it is
    not one tensor (a dict / tuple of inputs)."""
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return count_macs(model, shape)
    return int(tp.utils.count_ops_and_params(model, shape)[0])


def prune_once(model: nn.Module, config: PruneConfig, ratio: float, example_input: torch.Tensor,
               grads_ready: bool = False, keep_grads: bool = False) -> nn.Module:
    """Remove ``ratio`` of the channels (and heads) of every group of ``model``, in place.

    The classifier and ``config.ignore`` keep their widths. With ``taylor`` the parameters must
    already hold gradients (``grads_ready``); ``keep_grads`` leaves the (pruned) gradients in place for a
    further Taylor-ranked step. Returns the model, in the train/eval mode it had.
    """
    was_training = model.training
    if config.round_to == rounding.AUTO:  # called directly: resolve for this model's device / dtype
        config = replace(config, round_to=rounding.resolve(config.round_to, model)[0])
    ignored = ignored_layers(model, config)
    heads = {a.qkv: a.num_heads for a in attention_layers(model)} if config.prune_heads else {}
    head_ratio = 0.0
    if heads:  # keep at least one head per layer; TP removes ceil(ratio * heads)
        fewest = min(heads.values())
        head_ratio = min(ratio, (fewest - 1) / fewest) if fewest > 1 else 0.0
    if config.criterion == "taylor" and not grads_ready:
        raise PruningError("criterion 'taylor' needs gradients: call prune() with calibration batches")
    if config.criterion == "random":
        torch.manual_seed(config.seed)
    steps = config.global_steps if config.global_pruning else 1
    importance = make_importance(config.criterion, model)
    with warnings.catch_warnings(), _traced(model):
        warnings.simplefilter("ignore")
        with traceable(model):  # the dependency graph is traced here, once
            pruner = _group_rounding(rounding.pruner_class(config.round_to))(
                model, example_input, importance, pruning_ratio=ratio,
                global_pruning=config.global_pruning, iterative_steps=steps,
                max_pruning_ratio=config.max_layer_ratio if config.global_pruning else 1.0,
                ignored_layers=ignored, round_to=rounding.tp_round_to(config.round_to), num_heads=heads,
                prune_num_heads=bool(heads), prune_head_dims=not heads, head_pruning_ratio=head_ratio,
                out_channel_groups=channel_groups(model), **graph_kwargs(model))
        if pruner.round_to:
            _bind_group_rounding(pruner)
        if isinstance(importance, ScoreImportance):  # learned scores follow the removed channels
            importance.bind(pruner)
        for _ in range(steps):
            pruner.step()
    if isinstance(importance, ScoreImportance):
        importance.sync()
    record_history(model, pruner)
    sync_attributes(model, pruner.num_heads)
    if not keep_grads:
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return model


@functools.cache
def _group_rounding(cls: type) -> type:
    """``cls`` (a torch-pruning pruner) with width rounding per channel group.

    In a group of ``G`` equal channel groups (attention heads of ``nn.MultiheadAttention`` / Swin / MaxViT,
    grouped convolutions, GroupNorm) torch-pruning ranks and removes the same positions in every group,
    but hands its ``_round_to`` the count *per group* together with the *whole* width: the rounding then
    removes a multiple of the multiple from every group (a 768-wide ViT residual of 12 heads at ratio 0.3
    and ``round_to=8`` kept 480 channels, not 528; a ResNeXt 4-channel-per-group convolution was left
    whole). Here the rounding is applied per group with the multiple ``round_to / gcd(round_to, G)``, so
    the width kept, ``G`` times the per-group width, is a multiple of ``round_to`` as asked."""

    class GroupRounding(cls):
        def _round_to(self, n_pruned, current_channels, round_to):
            g = self._metaprune_groups.get(self._metaprune_root, 1) if hasattr(self, "_metaprune_groups") else 1
            if g <= 1 or current_channels % g:
                return super()._round_to(n_pruned, current_channels, round_to)
            per_group = int(round_to) // math.gcd(int(round_to), g)
            if per_group <= 1:
                return n_pruned
            multiple = type(round_to)(per_group) if isinstance(round_to, int) else per_group
            return super()._round_to(n_pruned, current_channels // g, multiple)

    GroupRounding.__name__ = GroupRounding.__qualname__ = f"GroupRounding{cls.__name__}"
    return GroupRounding


def _bind_group_rounding(pruner) -> None:
    """Tell a :func:`_group_rounding` pruner the channel groups of every group root, and which root it is
    rounding (torch-pruning asks the graph for the root's width right before it rounds)."""
    groups = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        g = pruner._get_channel_groups(group)
        if g > 1:
            groups[group[0].dep.target.module] = g
    pruner._metaprune_groups, pruner._metaprune_root = groups, None
    if not groups:
        return
    dg = pruner.DG

    def recording(fn):
        def width(module):
            pruner._metaprune_root = module
            return fn(module)
        return width

    dg.get_out_channels, dg.get_in_channels = recording(dg.get_out_channels), recording(dg.get_in_channels)


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that keeps ``.grad`` (deepcopy drops it; the Taylor criterion needs it)."""
    out = copy.deepcopy(model)
    for p, q in zip(model.parameters(), out.parameters()):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return out


def _heads(model: nn.Module) -> list[int]:
    return [a.num_heads for a in attention_layers(model)]


@contextlib.contextmanager
def _traced(model: nn.Module):
    """torch-pruning's tracing / pruning failures as one PruningError (ShuffleNet's channel shuffle is a
    ZeroDivisionError inside its index mapping)."""
    try:
        yield
    except (IndexError, RuntimeError, ZeroDivisionError, AssertionError, KeyError) as e:
        if "allocate" in str(e) or "out of memory" in str(e):  # not a tracing problem: let it say what it is
            raise
        what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise PruningError(f"torch-pruning could not prune {type(model).__name__} ({what}). Its dependency graph cannot "
                           "follow an operation of the model's forward (a channel shuffle / view over channels, or "
                           "chunk / indexing on channels): torch-pruning itself fails on it; try --ignore on the "
                           "failing block") from None


def _run_eval(model: nn.Module, x) -> object:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call(model, x)
    finally:
        model.train(was)


def _check_runs(model: nn.Module, x, signature: dict, keep_output: bool) -> None:
    try:
        out = _run_eval(model, x)
    except RuntimeError as e:
        raise PruningError(f"the pruned model does not run ({str(e).splitlines()[0]}); this is a bug, please "
                           "report it with the architecture name") from None
    check_outputs(signature, out, keep_output)


def _auto_reconstruct_skip(model: nn.Module, criterion: str, calibration, rec_batches) -> str | None:
    """Why ``reconstruct="auto"`` does not refit although it has batches (None: it refits, or has none)."""
    if rec_batches is None:
        return None
    if customized_pruners(model):
        return f"not available for {type(model).__name__} (its own torch-pruning pruners)"
    if rec_batches is calibration and iter(calibration) is calibration and criterion in ("taylor", "gate"):
        return (f"the calibration batches are a one-shot iterator that criterion {criterion!r} consumes; "
                "pass a list or a DataLoader to refit")
    return None


def prune(model: nn.Module, config: PruneConfig, example_input: torch.Tensor | None = None,
          input_shape: tuple[int, ...] | None = None,
          calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
          inplace: bool = False,
          reconstruct_calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> PruneResult:
    """Prune ``model`` structurally to ``config``'s target and return the smaller model.

    Args:
        model: any registered architecture (CNN or ViT), trained or not.
        config: the target (ratio, speed-up or params reduction) and how to rank channels.
        example_input: a batch of the model's input (only its first sample is used for tracing);
            or give ``input_shape`` (C, H, W); default: the architecture's input size.
        calibration: ``(x, y)`` batches, needed by the ``taylor`` and ``gate`` criteria and by
            reconstruction (which ``config.reconstruct="auto"``, the default, turns on when they are given).
        inplace: prune ``model`` itself (a plain ratio only); by default the input is left untouched.
        reconstruct_calibration: the refit's batches, when they should differ from ``calibration`` (the CLI
            gives ``taylor`` batches of 64 in file order and the refit seeded, shuffled batches of 128).

    A speed-up / params target is reached by bisection over the channel ratio (each trial prunes
    a fresh copy); the result is within ``config.tolerance`` of the target where the model's
    granularity allows, else ``target_met`` is False and ``notes`` says how close it got. An
    unreachable target raises :class:`PruningError`.
    """
    x = _example(model, example_input, input_shape)
    shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else x
    multiple, round_info = rounding.resolve(config.round_to, model)  # "auto": the device/dtype table
    config = replace(config, round_to=multiple if multiple > 1 else None)
    check_criterion(config.criterion, model, calibration is not None)
    auto_rec = config.reconstruct == "auto"
    rec_batches = calibration if reconstruct_calibration is None else reconstruct_calibration
    skipped_rec = _auto_reconstruct_skip(model, config.criterion, calibration, rec_batches) if auto_rec else None
    if auto_rec:  # on with calibration batches, where the dependency graph allows it
        config = replace(config, reconstruct=rec_batches is not None and skipped_rec is None)
    if customized_pruners(model) and (config.criterion == "gate" or config.reconstruct):
        what = "criterion 'gate'" if config.criterion == "gate" else "--reconstruct"
        raise PruningError(f"{what} is not available for {type(model).__name__}: it builds its own torch-pruning "
                           "dependency graph, which cannot follow torchvision's Swin window attention (it runs out "
                           "of memory); prune with another criterion (l2, l1, taylor, functional) and without "
                           "--reconstruct")
    resolve_ignored(model, config.ignore, classifier=not config.keep_output)  # validate names before any work
    signature = output_signature(_run_eval(model, x))  # what the pruned model's outputs must still look like
    if config.keep_output:  # protect the layers producing the outputs instead of guessing a classifier
        config = replace(config, ignore=tuple(dict.fromkeys(config.ignore + tuple(output_layers(model, x)))))
    macs0, params0 = _macs(model, shape), count_params(model)
    heads0 = _heads(model)
    base = model
    grads = False
    info: dict = {"round_to": round_info}
    if skipped_rec:
        info["reconstruct"] = {"skipped": skipped_rec, "auto": True}
    if config.reconstruct and rec_batches is None:
        raise PruningError("--reconstruct refits layers on calibration batches: call prune() with calibration "
                           "(the CLI: --data)")
    original = copy.deepcopy(model) if (config.reconstruct and inplace) else model
    if config.criterion == "taylor":
        base = model if inplace else copy.deepcopy(model)
        if accumulate_gradients(base, calibration, config.taylor_batches) == 0:
            raise PruningError("criterion 'taylor' got no calibration batches")
        grads = True
    if config.criterion == "gate":  # learn the ranking once; every trial prunes a copy carrying it
        from metaprune.pruning.gate import learn_gate_scores

        base = model if inplace else copy.deepcopy(model)
        info["gate"] = learn_gate_scores(base, config, x, calibration)
    if config.criterion == "metanet":  # one metanetwork pass ranks every trial's copy
        from metaprune.metanet.rank import attach_metanet_scores

        base = model if inplace else copy.deepcopy(model)
        info["metanet"] = attach_metanet_scores(base, config.metanet, config, x if isinstance(x, torch.Tensor) else None)
    kind, value = config.target

    def trial(ratio: float, final: bool = False, keep_grads: bool = False) -> tuple[nn.Module, int, int]:
        m = base if (final and inplace) else _copy_with_grads(base)
        prune_once(m, config, ratio, x, grads_ready=grads, keep_grads=keep_grads)
        return m, _macs(m, shape), count_params(m)

    trial.shape, trial.example, trial.grads = shape, x, grads
    widths0 = _prunable_widths(model, config)
    _check_round_to(config, widths0)
    groups0 = _group_widths(model, config, x)

    if kind == "ratio":
        m, macs1, params1 = trial(value, final=True)
        result = PruneResult(m, value, macs0, macs1, params0, params1, heads0, _heads(m), (kind, value),
                             uniform_ratio=value)
    else:
        result = _search(trial, config, kind, value, macs0, params0, heads0)
        while not result.target_met and isinstance(config.round_to, rounding.AutoMultiple):  # "auto": finer multiple
            round_info.setdefault("missed", []).append({"multiple": int(config.round_to), kind: result.speedup
                                                        if kind == "speedup" else result.params_reduction})
            config = replace(config, round_to=rounding.finer(config.round_to))  # `trial` sees the new config
            round_info["multiple"] = int(config.round_to or 1)
            result = _search(trial, config, kind, value, macs0, params0, heads0)
        if not result.target_met and result.notes:  # only the final miss: auto's finer multiple may meet it
            log.warning(result.notes[0])
    _measure_achieved(result, config, widths0, groups0)
    if config.reconstruct:
        from metaprune.pruning.reconstruct import reconstruct

        info["reconstruct"] = reconstruct(original, result.model, rec_batches, config.reconstruct_batches, x)
        info["reconstruct"]["auto"] = auto_rec
    from metaprune.pruning.gate import clear_scores

    result.history = list(getattr(result.model, HISTORY_ATTR, []) or [])
    for m in (result.model, base, model):
        clear_scores(m)
    result.info.update(info)
    _check_runs(result.model, x, signature, config.keep_output)
    if result.model is not model and config.criterion == "taylor" and not inplace:
        model.zero_grad(set_to_none=True)
    return result


def _search(trial, config: PruneConfig, kind: str, target: float, macs0: int, params0: int,
            heads0: list[int], stage: str = "uniform", f_start: float = 1.0, hi_cap: float | None = None,
            trials: list[dict] | None = None) -> PruneResult:
    """Find the channel ratio whose pruning reaches ``kind`` (speedup / params_ratio) within tolerance.

    Widths shrink by ``(1 - ratio)``, so MACs and params fall roughly like ``(1 - ratio) ** 2``:
    the search starts from that guess and then interpolates ``log(achieved)`` against
    ``log(1 - ratio)`` inside a bracket that always holds the target (regula falsi, with a
    bisection fallback), so it usually needs 2-4 trial prunes.
    """
    tol = config.tolerance
    trials = [] if trials is None else trials

    def measure(r: float):
        m, macs, params = trial(r)
        achieved = macs0 / max(1, macs) if kind == "speedup" else params0 / max(1, params)
        trials.append({"stage": stage, "ratio": round(r, 6), kind: achieved, "macs": macs, "params": params,
                       "criterion": config.criterion})
        return r, m, achieved, macs, params

    def good(a: float) -> bool:
        return abs(a / target - 1) <= tol / 2

    lo, f_lo = 0.0, f_start
    hi, f_hi = (config.max_layer_ratio if hi_cap is None else hi_cap), None
    best = measure(min(1.0 - (f_start / target) ** 0.5, hi))
    if best[2] >= target:
        hi, f_hi = best[0], best[2]
    else:
        lo, f_lo = best[0], best[2]
    if f_hi is None and not good(best[2]):
        top = measure(hi)
        if top[2] < target * (1 - tol):
            what = "MAC speed-up" if kind == "speedup" else "parameter reduction"
            raise PruningError(f"a {what} of {target:g}x is unreachable: removing {hi:.0%} of every group's "
                               f"channels (the max_layer_ratio cap) gives only {top[2]:.2f}x; ask for less, or "
                               "raise --max-layer-ratio")
        f_hi = top[2]
        best = top if _closer(top[2], best[2], target) else best
    side, refine, stale = 0, None, 0
    for _ in range(config.search_iters):
        if good(best[2]) or hi - lo < (5e-3 if stage == "uniform" else 1e-4):  # finer: the refine stage
            break
        # plateaus of rounded widths: the uniform stage hands over to the refine stage, which stops once in tolerance
        if stale >= 3 and (abs(best[2] / target - 1) <= tol or (stage == "uniform" and config.round_to)):
            break
        x_lo, x_hi = math.log(1 - lo), math.log(1 - hi)
        y_lo, y_hi = math.log(f_lo), math.log(f_hi)
        mid = 0.5 * (lo + hi)
        if y_hi > y_lo and abs(side) < 2:  # interpolate inside the bracket; bisect if one end is stuck
            t = min(0.95, max(0.05, (math.log(target) - y_lo) / (y_hi - y_lo)))
            mid = 1 - math.exp(x_lo + t * (x_hi - x_lo))
        cur = measure(mid)
        stale = stale + 1 if cur[2] in (f_lo, f_hi) else 0
        if cur[2] >= target:
            hi, f_hi = mid, cur[2]
            side = side + 1 if side > 0 else 1
        else:
            lo, f_lo = mid, cur[2]
            side = side - 1 if side < 0 else -1
        if _closer(cur[2], best[2], target):
            best = cur
    if abs(best[2] / target - 1) > tol and lo > 0 and stage == "uniform":
        # a uniform ratio moves all widths at once (coarse steps on small models; heads are
        # discrete): from the ratio just below the target, remove the globally least important
        # channels (heads kept) with a second, global search
        # the same criterion as the uniform stage: Taylor keeps the (pruned) gradients of the first stage
        lo_model = trial(lo, keep_grads=True)[0]
        fine_cfg = replace(config, global_pruning=True, global_steps=1, prune_heads=False)
        x, grads = trial.example, getattr(trial, "grads", False)

        def trial2(g: float):
            m = prune_once(_copy_with_grads(lo_model), fine_cfg, g, x, grads_ready=grads)
            return m, _macs(m, trial.shape), count_params(m)

        try:
            fine = _search(trial2, config, kind, target, macs0, params0, heads0, stage="global-refine",
                           f_start=f_lo, hi_cap=0.5, trials=trials)
        except PruningError:
            fine = None
        if fine is not None and _closer(fine.speedup if kind == "speedup" else fine.params_reduction,
                                        best[2], target):
            best = (lo, fine.model, fine.speedup if kind == "speedup" else fine.params_reduction,
                    fine.macs_after, fine.params_after)
            refine = fine.uniform_ratio
        lo_model.zero_grad(set_to_none=True)
    r_best, m, achieved, macs, params = best
    m.zero_grad(set_to_none=True)
    met = abs(achieved / target - 1) <= tol
    notes = [] if met else [f"the closest reachable {kind} is {achieved:.3f}x (target {target:g}x, tolerance "
                            f"{tol:.0%}); the model's channel granularity (or --round-to) allows no closer value"]
    return PruneResult(m, r_best, macs0, macs, params0, params, heads0, _heads(m), (kind, target), met,
                       trials, notes, uniform_ratio=r_best, refine_ratio=refine)


def _prunable_widths(model: nn.Module, config: PruneConfig) -> dict[str, int]:
    """Output width of every conv / linear layer the target applies to (not the classifier, not
    ``config.ignore``, not the attention of ``prune_heads=False``)."""
    skip = {id(m) for m in ignored_layers(model, config)}
    out = {}
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def _group_widths(model: nn.Module, config: PruneConfig, x: torch.Tensor) -> dict[str, int]:
    """Width of every dependency group torch-pruning may prune (coupled layers share their channels),
    keyed by the group's root layer: what "share of the channels of every group" is counted on."""
    ignored = ignored_layers(model, config)
    names = {m: n for n, m in model.named_modules()}
    with warnings.catch_warnings(), _traced(model):
        warnings.simplefilter("ignore")
        dg = dependency_graph(model, x)
        out = {}
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            root = group[0].dep.target.module
            if root in names:
                out[names[root]] = int(dg.get_out_channels(root))
    return out


def _out_width(modules: dict[str, nn.Module], name: str) -> int | None:
    m = modules.get(name)
    return getattr(m, "out_channels", None) or getattr(m, "out_features", None)


def _check_round_to(config: PruneConfig, widths: dict[str, int]) -> None:
    """``round_to`` must leave some layer prunable: keeping a multiple of it below the width."""
    if isinstance(config.round_to, rounding.AutoMultiple):  # per-layer multiples: always something to prune
        return
    if config.round_to and widths and config.round_to >= max(widths.values()):
        raise PruningError(f"--round-to {config.round_to} is not smaller than the widest prunable layer "
                           f"({max(widths.values())} channels): every layer would keep all its channels, nothing "
                           "can be pruned; use a smaller --round-to (e.g. 8) or leave it out")


def _kept_by_tp(width: int, ratio: float, round_to: int | None) -> int:
    """Channels torch-pruning keeps of a ``width``-channel group at a uniform ``ratio`` (0: it skips the group)."""
    keep = int(width * (1 - ratio))
    if isinstance(round_to, rounding.AutoMultiple):
        return rounding.kept_channels(width, keep, round_to) if keep >= 1 else keep
    if round_to:
        keep -= keep % round_to
    return keep


def _measure_achieved(result: PruneResult, config: PruneConfig, widths0: dict[str, int],
                      groups0: dict[str, int]) -> None:
    """Set ``ratio`` (share of the prunable groups' channels removed, as torch-pruning counts a ratio)
    and ``layer_ratios`` from the pruned model, and for a ratio target decide ``target_met`` from them.
    Nothing pruned at all raises :class:`PruningError`."""
    kind, value = result.target
    modules = dict(result.model.named_modules())  # once: looked up for every layer and group below
    result.layer_ratios = {n: round(1 - (_out_width(modules, n) or w) / w, 6) for n, w in widths0.items()}
    result.criterion = config.criterion
    after = {n: (_out_width(modules, n) or w) for n, w in groups0.items()}
    # a group left whole is "blocked" when the granularity left torch-pruning nothing to keep (it never
    # empties a group)
    ref = result.uniform_ratio if result.uniform_ratio is not None else value
    blocked = [n for n, w in groups0.items() if after[n] == w and _kept_by_tp(w, ref, config.round_to) < 1]
    total0 = sum(groups0.values())
    result.ratio = round(1 - sum(after.values()) / total0, 6) if total0 else 0.0
    why = (f"with --round-to {config.round_to}, " if config.round_to else "") + "torch-pruning would keep no channel of them and never empties a layer"
    if result.params_after >= result.params_before and result.macs_after >= result.macs_before:
        hint = ""
        if kind == "ratio" and widths0:
            w = min(widths0.values())
            hint = (f"; the narrowest prunable layer has {w} channels, so a ratio up to {1 - 1 / w:.3f} keeps "
                    "at least one channel in every layer" if not config.round_to else
                    f"; --round-to {config.round_to} needs layers wider than {config.round_to} channels and a ratio "
                    f"that keeps at least {config.round_to} of them")
        raise PruningError(f"nothing was pruned: {kind} {value:g} leaves every prunable layer unchanged "
                           f"({why}){hint}; ask for less")
    if kind != "ratio":
        return
    if result.ratio < value * (1 - config.tolerance):
        result.target_met = False
        names = ", ".join(blocked[:4]) + (f" and {len(blocked) - 4} more" if len(blocked) > 4 else "")
        note = (f"only {result.ratio:.1%} of the channels were removed (asked {value:.1%})"
                + (f": {len(blocked)} channel group(s) kept all their channels (groups of {names}) because {why}"
                   if blocked else ""))
        result.notes.append(note)
        log.warning("warning: %s", note)


def _closer(a: float, b: float, target: float) -> bool:
    """Is ``a`` a better hit of ``target`` than ``b`` (values at or above the target win ties)?"""
    da, db = abs(math.log(a / target)), abs(math.log(b / target))
    if abs(da - db) < 1e-9:
        return a >= target > b
    return da < db


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear layer and head count of every attention layer (for reports)."""
    out: dict[str, int] = {}
    for name, attrs in get_widths(model).items():
        for key in ("out_channels", "out_features", "num_heads"):
            if key in attrs:
                out[name + (".heads" if key == "num_heads" else "")] = int(attrs[key])
    return out
