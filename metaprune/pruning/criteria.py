"""Channel-importance criteria, by name, as torch-pruning importance objects.

Besides torch-pruning's own (``l2``, ``l1``, ``bn``, ``taylor``, ``random``) two per-network baselines:

* ``functional`` (:class:`FunctionalImportance`, free): how much a channel can carry times how much the
  next layers read of it: ``(sum over the group's normalisation layers of ||(gamma_c, beta_c)||)``
  (without a BatchNorm / LayerNorm in the group: the producers' ``||(w_c, b_c)||``, their output rows)
  ``x (sum over the group's consumers of ||W[:, c]||)``, the norms of the consumers' input columns.
* ``gate`` (:class:`ScoreImportance` with scores from :func:`metaprune.pruning.gate.learn_gate_scores`):
  one score per pruning group channel (per head for attention) optimised on data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError, PruningError

#: attribute of a model (copy) that carries the learned ``gate`` scores through torch-pruning's trials
SCORES_ATTR = "_metaprune_gate_scores"
#: attribute recording torch-pruning's pruning history ``[root name, is_out, root idxs]`` (reconstruction)
HISTORY_ATTR = "_metaprune_prune_history"

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_OUT_FNS = (tp.pruner.function.prune_conv_out_channels, tp.pruner.function.prune_linear_out_channels)
_IN_FNS = (tp.pruner.function.prune_conv_in_channels, tp.pruner.function.prune_linear_in_channels)
_NORM_FNS = (tp.pruner.function.prune_batchnorm_out_channels, tp.pruner.function.prune_layernorm_out_channels,
             tp.pruner.function.prune_groupnorm_out_channels)


def make_importance(name: str, model: nn.Module | None = None) -> tp.importance.Importance:
    """The torch-pruning importance for a criterion name (see :data:`metaprune.pruning.config.CRITERIA`).

    ``gate`` ranks by the scores :func:`metaprune.pruning.gate.attach_scores` put on ``model``.
    """
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    if name == "functional":
        return FunctionalImportance()
    if name == "gate":
        if model is None or getattr(model, SCORES_ATTR, None) is None:
            raise PruningError("criterion 'gate' needs learned scores: call prune() with calibration batches "
                               "(the CLI: --data)")
        return ScoreImportance(model)
    if name == "metanet":  # scores of one score-metanetwork pass (metaprune.metanet.rank)
        if model is None or getattr(model, SCORES_ATTR, None) is None:
            raise PruningError("criterion 'metanet' needs the metanetwork's scores: call prune() with "
                               "PruneConfig(criterion='metanet', metanet=CHECKPOINT)")
        return ScoreImportance(model)
    raise ConfigError(f"unknown criterion {name!r}; valid: l2, l1, bn, taylor, random, functional, gate, metanet")


def check_criterion(name: str, model: nn.Module, has_calibration: bool) -> None:
    """Refuse a criterion that cannot rank this model's channels."""
    if name == "bn" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("criterion 'bn' ranks channels by BatchNorm scale, but this model has no BatchNorm "
                          "layers (a ViT?); use l2, l1, functional or taylor")
    if name == "taylor" and not has_calibration:
        raise ConfigError("criterion 'taylor' needs gradients from data; pass --data (or calibration batches)")
    if name == "gate" and not has_calibration:
        raise ConfigError("criterion 'gate' learns its channel scores on training batches; pass --data (or "
                          "calibration batches), or use the data-free 'functional' or 'l2'")


def _root_idx(item) -> torch.Tensor | None:
    r = item.root_idxs
    if r is None or any(i is None for i in r):
        return None
    return torch.as_tensor(list(r), dtype=torch.long)


class FunctionalImportance(tp.importance.Importance):
    """``||(gamma, beta)|| x ||next layer's input columns||`` per channel of a torch-pruning group.

    Producer factor: the sum over the group's affine normalisation layers of ``||(gamma_c, beta_c)||_2``
    (what a BN-normalised channel can carry); in a group without one (ViT MLP, attention), the sum over its
    conv / linear producers of ``||(w_c, b_c)||_2`` (output rows). Consumer factor: the sum over the
    group's conv / linear consumers of ``||W[:, c]||_2`` (input columns; all positions a channel feeds,
    e.g. after a flatten). Divided by the group mean (torch-pruning's convention, for ``--global``).
    """

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        norm_p = torch.zeros(n)
        lin_p = torch.zeros(n)
        cons = torch.zeros(n)
        has_norm = has_cons = False
        for item in group:
            dep, idxs = item.dep, list(item.idxs)
            layer, fn = dep.target.module, dep.handler
            root = _root_idx(item)
            if root is None or not idxs:
                continue
            ix = torch.as_tensor(idxs, dtype=torch.long)
            if fn in _NORM_FNS and isinstance(layer, _NORMS):
                w = getattr(layer, "weight", None)
                if w is None:
                    continue
                sq = w.detach().float().cpu()[ix] ** 2
                if getattr(layer, "bias", None) is not None:
                    sq = sq + layer.bias.detach().float().cpu()[ix] ** 2
                norm_p += torch.zeros(n).scatter_add_(0, root, sq).sqrt()
                has_norm = True
            elif fn in _OUT_FNS and isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                w = layer.weight.detach().float().cpu()
                w = (w.transpose(0, 1) if getattr(layer, "transposed", False) else w)[ix].flatten(1)
                sq = (w ** 2).sum(1)
                if layer.bias is not None:
                    sq = sq + layer.bias.detach().float().cpu()[ix] ** 2
                lin_p += torch.zeros(n).scatter_add_(0, root, sq).sqrt()
            elif fn in _IN_FNS and isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1:
                    continue  # depthwise / grouped: its "columns" are its own channels
                w = layer.weight.detach().float().cpu()
                w = (w if getattr(layer, "transposed", False) else w.transpose(0, 1))[ix].flatten(1)
                cons += torch.zeros(n).scatter_add_(0, root, (w ** 2).sum(1)).sqrt()
                has_cons = True
        prod = norm_p if has_norm else lin_p
        if not has_cons:
            cons = torch.ones(n)
        imp = prod * cons
        if not torch.isfinite(imp).all() or imp.sum() <= 0:
            return None if imp.numel() == 0 else torch.ones(n)
        return imp / imp.mean()


class ScoreImportance(tp.importance.Importance):
    """Importance from per-group scores learned beforehand (the ``gate`` criterion).

    The scores live on the model being pruned (attribute ``SCORES_ATTR``: ``{"scores": {key: tensor},
    "initial": {key: channels}}``, ``key = "<root module name>:<out|in>"``, one value per
    current channel of the group's root, heads broadcast over their channels). They are deep-copied with the
    model, and :meth:`bind` lets them follow torch-pruning's removals, so iterative (global) steps and
    re-pruning an already pruned copy stay aligned. With global pruning, the best
    ``ceil((1 - max_pruning_ratio) * initial)`` channels of every group are protected (the per-layer cap).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = getattr(model, SCORES_ATTR)
        self.names = {m: n for n, m in model.named_modules()}
        self.pruner = None
        self._seen = 0

    def bind(self, pruner) -> None:
        self.pruner = pruner
        self._seen = len(pruner.pruning_history())

    def sync(self) -> None:
        """Drop the scores of channels torch-pruning removed since the last call."""
        if self.pruner is None:
            return
        hist = self.pruner.pruning_history()
        for name, is_out, idxs in hist[self._seen:]:
            key = f"{name}:{'out' if is_out else 'in'}"
            s = self.state["scores"].get(key)
            if s is not None:
                keep = torch.ones(len(s), dtype=torch.bool)
                keep[torch.as_tensor(list(idxs), dtype=torch.long)] = False
                self.state["scores"][key] = s[keep]
        self._seen = len(hist)

    def key(self, group) -> str:
        dep = group[0].dep
        is_out = self.pruner.DG.is_out_channel_pruning_fn(dep.handler) if self.pruner is not None else \
            dep.handler in _OUT_FNS
        return f"{self.names.get(dep.target.module, '?')}:{'out' if is_out else 'in'}"

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        self.sync()
        key = self.key(group)
        s = self.state["scores"].get(key)
        if s is None:
            return None  # a group the gate did not see: torch-pruning leaves it alone
        n = len(group[0].idxs)
        if len(s) != n:
            raise PruningError(f"gate scores of {key} hold {len(s)} channels but the layer has {n}; the model "
                               "changed after the scores were learned")
        s = s.clone().float()
        if not self.state.get("global", True) and n > 0:
            # scores learned per group (uniform top-k) are comparable only inside their group: a global
            # ranking (the engine's refine stage after the uniform search) compares the share of the group's
            # initial channels that would be gone, so it removes where a channel is the smallest share
            initial = self.state["initial"][key]
            rank = torch.empty(n).scatter_(0, torch.argsort(s, stable=True), torch.arange(n, dtype=torch.float))
            z = (s - s.mean()) / s.std().clamp_min(1e-12) if n > 1 else torch.zeros(n)
            s = (initial - n + rank + 0.5) / initial + 1e-4 * torch.sigmoid(z)  # ties: the group's own scale
        cap = self.pruner.max_pruning_ratio if (self.pruner is not None and self.pruner.global_pruning) else None
        if cap is not None and cap < 1.0:  # protect the best ceil((1 - cap) * initial) channels of the group
            keep_min = min(n, max(1, math.ceil((1 - cap) * self.state["initial"][key] - 1e-9)))
            top = torch.topk(s, keep_min).indices
            s[top] = s[top] + 1e6
        return s


def record_history(model: nn.Module, pruner) -> None:
    """Append the pruner's history to the model's (used by reconstruction to find the kept channels)."""
    old = list(getattr(model, HISTORY_ATTR, []) or [])
    setattr(model, HISTORY_ATTR, old + [[n, bool(o), [int(i) for i in ix]] for n, o, ix in pruner.pruning_history()])


def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         max_batches: int) -> int:
    """Sum cross-entropy gradients of ``max_batches`` batches into ``.grad`` (eval mode: BN stats untouched).

    Returns the number of batches used.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    n = 0
    with torch.enable_grad():
        for x, y in batches:
            if n >= max_batches:
                break
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            n += 1
    model.train(was_training)
    return n
