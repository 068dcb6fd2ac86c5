"""Channel-importance criteria, by name, as torch-pruning importance objects."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning importance for a criterion name (see :data:`metaprune.pruning.config.CRITERIA`)."""
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
    raise ConfigError(f"unknown criterion {name!r}; valid: l2, l1, bn, taylor, random")


def check_criterion(name: str, model: nn.Module, has_calibration: bool) -> None:
    """Refuse a criterion that cannot rank this model's channels."""
    if name == "bn" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("criterion 'bn' ranks channels by BatchNorm scale, but this model has no BatchNorm "
                          "layers (a ViT?); use l2, l1 or taylor")
    if name == "taylor" and not has_calibration:
        raise ConfigError("criterion 'taylor' needs gradients from data; pass --data (or calibration batches)")


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
