"""Shared helpers for the graph tests: randomised models and exact comparisons."""

from __future__ import annotations

import torch
from torch import nn

from metaprune.models import create_model


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics, affine params and counters, and every
    bias non-zero values, so that a round trip that drops or mixes any of them fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.Linear) and not m.weight.any():  # torchvision zero-inits the ViT head
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
            for name, p in m.named_parameters(recurse=False):
                if name == "bias" or "token" in name or "pos_embedding" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def small_model(name: str, **kw) -> nn.Module:
    """A registered architecture with 7 classes (an odd count catches transposed classifiers)."""
    torch.manual_seed(0)
    return randomise(create_model(name, num_classes=7, **kw))


def input_for(model: nn.Module, batch: int = 3) -> torch.Tensor:
    """A batch that fits the model (32 px unless the model fixes its size)."""
    args = model.metaprune_arch["args"]
    size = args.get("image_size", 32)
    return torch.randn(batch, args.get("in_chans", 3), size, size, generator=torch.Generator().manual_seed(1))


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same keys in the same order, same dtypes, bitwise-equal tensors, same mode, same widths."""
    from metaprune.models import get_widths

    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.training == b.training
    assert get_widths(a) == get_widths(b)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Identical outputs in the current mode (in train mode BN also updates both models' stats)."""
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def assert_round_trips(model: nn.Module, x: torch.Tensor, cache: bool = True) -> None:
    """model -> graph -> model is exact in eval and in train mode: same tensors, same outputs."""
    from metaprune.graph import from_graph, to_graph

    for train in (False, True):
        model.train(train)
        back = from_graph(to_graph(model, cache=cache))
        assert_same_model(model, back)
        assert_same_outputs(model, back, x)
