"""Turning a source model into an adapted, maskable model (and back into a plain one)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from metaprune.errors import ConfigError
from spa.methods import FullLayer, MethodConfig, get_method
from spa.methods.base import AdaptedLayer

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def find_head(model: nn.Module) -> str:
    """Module path of the classifier head: the last ``nn.Linear`` in module order."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ConfigError(f"{type(model).__name__} has no Linear classifier head to replace")
    return name


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapt_model(source: nn.Module, method: str, cfg: MethodConfig | None = None,
                num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``source`` with every supported Conv2d/Linear replaced by the method's adapted layer.

    The source weights are frozen (the adapted layers hold frozen copies); norm parameters, biases,
    adapter factors and a new classifier head with ``num_classes`` outputs (or the source head,
    re-trained, when ``None``) are trainable. With the zero-initialised up-projections the adapted
    model computes exactly the source function (up to the new head). ``method="full"`` trains every
    weight (fine-pruning). The result carries ``spa_head`` (head path) and ``spa_method``.
    """
    cfg_cls, layer_cls = get_method(method)
    cfg = cfg or cfg_cls()
    model = copy.deepcopy(source)
    head = find_head(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for p in model.parameters():
            p.requires_grad_(method == "full")
        for name, m in list(model.named_modules()):
            if name == head or not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, AdaptedLayer):
                continue
            if layer_cls.supports(m):
                _set(model, name, layer_cls(m, cfg))
        old = model.get_submodule(head)
        new_head = nn.Linear(old.in_features, num_classes or old.out_features, bias=old.bias is not None)
        if num_classes is None:
            new_head.load_state_dict(old.state_dict())
        _set(model, head, FullLayer(new_head.to(old.weight.device, old.weight.dtype)))
    finally:
        torch.random.set_rng_state(gen_state)
    for m in model.modules():
        if isinstance(m, _NORMS):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    arch = getattr(source, "metaprune_arch", None)
    if arch is not None:
        model.metaprune_arch = {"arch": arch["arch"], "args": {**arch["args"], "num_classes": model.get_submodule(head).out_channels}}
    model.spa_head = head
    model.spa_method = method
    return model


def fuse_model(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by its plain fused, masked ``Conv2d``/``Linear`` (in place; returns it)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, AdaptedLayer):
            _set(model, name, m.to_module())
    for attr in ("spa_head", "spa_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def learned_parameters(model: nn.Module) -> dict[str, int]:
    """The paper's counting rule on kept channels: adapter factors + biases + norm affine + head.

    Running statistics are not counted. Only entries of kept channels count (a factor row of a
    pruned output channel is not stored, so not learned).
    """
    adapter = bias = head = norm = 0
    head_name = getattr(model, "spa_head", None)
    mods = dict(model.named_modules())
    for name, m in mods.items():
        if isinstance(m, AdaptedLayer):
            ko, ki = int((m.out_mask > 0).sum()), int((m.in_mask > 0).sum())
            n_w = ko * ki * (m.weight[0, 0].numel() if m.kind == "conv" else 1) if m.weight.requires_grad else 0
            n_f = 0
            for fname, dims in m.factor_dims().items():
                shape = list(getattr(m, fname).shape)
                for ax, d in enumerate(dims):
                    if d is not None:
                        shape[ax] = ko if d == "out" else ki
                n_f += int(torch.tensor(shape).prod())
            n_b = ko if m.bias is not None and m.bias.requires_grad else 0
            if name == head_name:
                head += n_w + n_b
            else:
                adapter += n_w + n_f
                bias += n_b
        elif isinstance(m, _NORMS):
            n = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            k = _norm_kept(model, name, m)
            norm += n if k is None else n * k // max(1, getattr(m, "num_features", k))
    return {"adapter": adapter, "bias": bias, "norm": norm, "head": head, "total": adapter + bias + norm + head}


def _norm_kept(model: nn.Module, name: str, m: nn.Module) -> int | None:
    masks = getattr(model, "spa_norm_masks", None) or {}
    if name in masks:
        return int(masks[name].sum())
    return None
