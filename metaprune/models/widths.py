"""Per-layer widths of a (possibly pruned) model, and rebuilding a model at given widths.

A pruned model is stored as its registry spec plus these widths plus its weights; reloading
builds the registered architecture, resizes it here, then loads the weights strictly. No pickle.
"""

from __future__ import annotations

import torch
from torch import nn

from metaprune.errors import ModelFileError
from metaprune.models.layers import SelfAttention

# module attributes that describe the structure of a layer, by module type
_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm1d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    SelfAttention: ("num_heads",),
}
# model-level attributes some architectures read in forward (torchvision ViT)
_MODEL_ATTRS = ("hidden_dim",)


def _attrs_for(module: nn.Module) -> tuple[str, ...]:
    for cls in type(module).__mro__:
        if cls in _ATTRS:
            return _ATTRS[cls]
    return ()


def get_widths(model: nn.Module) -> dict[str, dict]:
    """Structural attributes of every prunable layer, keyed by module path (JSON-friendly)."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in _attrs_for(m)}
        attrs.update({a: getattr(m, a) for a in _MODEL_ATTRS if isinstance(getattr(m, a, None), int)})
        if attrs:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    return out


def apply_widths(model: nn.Module, widths: dict[str, dict], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Resize ``model`` in place to ``widths`` and the tensor shapes of ``state_dict``.

    Attributes come from ``widths``; every parameter or buffer whose shape differs from the
    state dict is replaced by an uninitialised tensor of the stored shape (the following
    ``load_state_dict`` fills it). Returns the model.
    """
    modules = dict(model.named_modules())
    for name, attrs in widths.items():
        if name not in modules:
            raise ModelFileError(f"the model file names a layer {name!r} that architecture "
                                 f"{type(model).__name__} does not have; the file belongs to another architecture")
        m = modules[name]
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    for mod_name, m in modules.items():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(m.named_parameters(recurse=False)):
            key = prefix + pname
            if key in state_dict and state_dict[key].shape != p.shape:
                setattr(m, pname, nn.Parameter(torch.empty(state_dict[key].shape, dtype=p.dtype),
                                               requires_grad=p.requires_grad))
        for bname, b in list(m.named_buffers(recurse=False)):
            key = prefix + bname
            if b is not None and key in state_dict and state_dict[key].shape != b.shape:
                m.register_buffer(bname, torch.empty(state_dict[key].shape, dtype=b.dtype))
    return model
