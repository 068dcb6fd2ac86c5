"""DepGraph group-norm sparse learning: the gradient it adds, and that it shrinks group norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaprune.models import create_model
from metaprune.pruning import SparseRegularizer


def _train(lam: float, steps: int = 6):
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    reg = SparseRegularizer(model, (1, 16, 16), lam)
    assert model.training  # tracing must not leave the model in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    reg.on_epoch_start(model, 0)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        reg.after_backward(model)
        opt.step()
    return model, reg


def test_large_lambda_shrinks_group_norms():
    _, reg0 = _train(0.0)
    _, reg1 = _train(0.5)
    n0 = torch.cat(reg0.group_norms())
    n1 = torch.cat(reg1.group_norms())
    assert n1.sum() < 0.9 * n0.sum()
    assert (n1 < n0).float().mean() > 0.9  # nearly every channel group shrank


def test_added_gradient_is_lambda_gamma_w():
    """For one group, the added gradient on a conv out-row is lam * alpha**((max-imp)/(max-min)) * w:
    the weakest channel is pushed ``alpha`` times harder (relative to its weight) than the strongest."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    conv = model.conv1  # the stem: only its out-rows belong to a group (its input is the image)
    lam, alpha = 0.1, 16.0
    reg = SparseRegularizer(model, (1, 16, 16), lam, alpha=alpha)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.after_backward(model)
    ratio = (conv.weight.grad / conv.weight).flatten(1)  # = lam * gamma, the same across a row
    per_channel = ratio.mean(1)
    assert torch.allclose(ratio, per_channel[:, None].expand_as(ratio), rtol=1e-4)
    assert abs(per_channel.max().item() / per_channel.min().item() - alpha) < 1e-3 * alpha
    assert abs(per_channel.min().item() - lam) < 1e-5  # strongest channel: gamma = 1
