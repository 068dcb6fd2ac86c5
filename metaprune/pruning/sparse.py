"""DepGraph's group-norm sparse learning ("SL"): a regulariser that pushes whole coupled
channel groups towards zero during training, so that pruning them later costs little.

It is torch-pruning's ``GroupNormPruner``: every step, for each dependency group with L2 group
importance ``imp`` (normalised by its max), each channel gets ``gamma = alpha ** ((max - imp) /
(max - min))`` and ``lambda * gamma * w`` is added to the gradient of every coupled slice (conv /
linear out-rows and in-columns, BatchNorm weights). Weak groups are pushed up to ``alpha`` times
harder than strong ones. The reference CIFAR runs use lambda 5e-4, alpha 16 and weight decay 0.
"""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError
from metaprune.pruning.structure import attention_layers, resolve_ignored, unwrapped_parameters


class SparseRegularizer:
    """Group-norm sparsity regulariser for :func:`metaprune.engine.train` (its ``regularizer`` hook).

    Args:
        model: the model to be trained (traced once here; keep training this same object).
        input_shape: (C, H, W) of one input image.
        lam: regularisation strength (DepGraph's ``reg``), e.g. 5e-4.
        alpha: strongest / weakest push ratio; torch-pruning's ``regularize`` default, 16.
        ignore: layer names whose output widths are protected (the classifier always is).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], lam: float, alpha: float = 16.0,
                 ignore: tuple[str, ...] = ()):
        if lam < 0 or alpha < 1:
            raise ConfigError(f"sparse regulariser needs lambda >= 0 and alpha >= 1 (got {lam}, {alpha})")
        self.lam = float(lam)
        self.alpha = float(alpha)
        was_training = model.training
        device = next(model.parameters()).device
        heads = {a.qkv: a.num_heads for a in attention_layers(model)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pruner = tp.pruner.GroupNormPruner(
                model, torch.randn(1, *input_shape, device=device),
                tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"), reg=self.lam,
                ignored_layers=resolve_ignored(model, ignore), num_heads=heads,
                unwrapped_parameters=unwrapped_parameters(model))
        model.train(was_training)  # tracing leaves the model in eval mode

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Re-collect the dependency groups (required after any structural change)."""
        self.pruner.update_regularizer()

    def after_backward(self, model: nn.Module) -> None:
        """Add the group-norm penalty's gradient; call between ``backward()`` and ``optimizer.step()``."""
        if self.lam > 0:
            # alpha must be passed here: GroupNormPruner.regularize ignores the constructor's alpha
            self.pruner.regularize(model, alpha=self.alpha)

    @torch.no_grad()
    def group_norms(self) -> list[torch.Tensor]:
        """L2 norm of every channel of every prunable group (unnormalised), for inspection and tests."""
        imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="sum")
        out = []
        for group in self.pruner.DG.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                                   root_module_types=self.pruner.root_module_types):
            v = imp(group)
            if v is not None:
                out.append(v.sqrt())
        return out
