"""Per-layer widths of a (possibly pruned) model, and rebuilding a model at given widths.

A pruned model is stored as its registry spec plus these widths plus its weights; reloading
builds the registered architecture, resizes it here, then loads the weights strictly. No pickle.

Widths come from files, so they are untrusted: only the structural attributes listed in
:data:`_ATTRS` (per layer type) can be set, each must be a positive integer (a list of them for
``normalized_shape``), and :func:`check_layer_shapes` verifies that they agree with the tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from metaprune.errors import ModelFileError
from metaprune.models.layers import SelfAttention

# module attributes that describe the structure of a layer, by module type
# (subclasses inherit them: LayerNorm2d of torchvision's ConvNeXt and timm are nn.LayerNorm). Parameters
# without attributes (layer scale / gamma, position embeddings, class tokens) take their stored shapes.
_ATTRS: dict[type, tuple[str, ...]] = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),  # noqa: SLF001 - Conv1/2/3d, transposed
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),  # noqa: SLF001 - BatchNorm*, InstanceNorm*
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.MultiheadAttention: ("embed_dim", "kdim", "vdim", "num_heads", "head_dim"),
    SelfAttention: ("num_heads",),
}
# layers of optional packages, by qualified class name (not imported here)
_ATTRS_BY_NAME: dict[str, tuple[str, ...]] = {
    "timm.models.vision_transformer.Attention": ("num_heads", "head_dim"),
    "timm.layers.attention.Attention": ("num_heads", "head_dim"),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("num_heads",),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("num_heads",),
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": ("n_heads", "head_dim"),
}
# attention layers whose q/k/v width is their input width (pruned as one layer by metaprune.pruning.structure):
# class path -> (q/k/v Linear, output Linear, head count, head size or None) attribute names
WHOLE_ATTENTION: dict[str, tuple[str, str, str, str | None]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj", "num_heads", None),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("qkv", "proj", "num_heads", None),
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": ("to_qkv", "merge", "n_heads", "head_dim"),
}
# model-level attributes some architectures read in forward (torchvision ViT)
_MODEL_ATTRS = ("hidden_dim",)
_MAX_WIDTH = 1 << 24  # far above any real layer; keeps a hostile file from asking for absurd sizes


def _attrs_for(module: nn.Module) -> tuple[str, ...]:
    for cls in type(module).__mro__:
        if cls in _ATTRS:
            return _ATTRS[cls]
        named = _ATTRS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return ()


def _model_attrs(module: nn.Module) -> tuple[str, ...]:
    return tuple(a for a in _MODEL_ATTRS
                 if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool))


def get_widths(model: nn.Module) -> dict[str, dict]:
    """Structural attributes of every prunable layer, keyed by module path (JSON-friendly)."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in _attrs_for(m)}
        attrs.update({a: getattr(m, a) for a in _model_attrs(m)})
        if attrs:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    return out


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_WIDTH:
        raise ModelFileError(f"{what} must be a positive integer, not {v!r}; the model file's metadata is corrupt "
                             "or was edited")
    return v


def check_widths(model: nn.Module, widths, where: str = "the model file") -> dict[str, dict]:
    """Validate stored ``widths`` against ``model``'s layers; returns them with tuples for lists.

    Every layer name must exist, every attribute must be a structural attribute of that layer
    type, every value a positive integer. Anything else raises :class:`ModelFileError`.
    """
    if not isinstance(widths, dict):
        raise ModelFileError(f"{where}: 'widths' must be a JSON object of layer -> attributes, not "
                             f"{type(widths).__name__}; the metadata is corrupt")
    modules = dict(model.named_modules())
    out: dict[str, dict] = {}
    for name, attrs in widths.items():
        if name not in modules:
            raise ModelFileError(f"{where} names a layer {name!r} that architecture {type(model).__name__} does not "
                                 "have; the file belongs to another architecture or its metadata is corrupt")
        if not isinstance(attrs, dict):
            raise ModelFileError(f"{where}: the widths of layer {name!r} must be a JSON object, not "
                                 f"{type(attrs).__name__}")
        m = modules[name]
        allowed = _attrs_for(m) + _model_attrs(m)
        clean: dict = {}
        for k, v in attrs.items():
            if k not in allowed:
                raise ModelFileError(
                    f"{where}: layer {name!r} ({type(m).__name__}) cannot take {k!r} from a file (only "
                    f"{', '.join(allowed) or 'nothing'}); refusing metadata that would change the layer's behaviour")
            what = f"{where}: {name or '<model>'}.{k}"
            if k == "normalized_shape":
                cur = tuple(getattr(m, k))
                if not isinstance(v, list) or len(v) != len(cur):
                    raise ModelFileError(f"{what} must be a list of {len(cur)} positive integers, not {v!r}")
                clean[k] = tuple(_positive_int(x, what) for x in v)
            else:
                clean[k] = _positive_int(v, what)
        out[name] = clean
    return out


def apply_widths(model: nn.Module, widths: dict[str, dict], state_dict: dict[str, torch.Tensor],
                 where: str = "the model file") -> nn.Module:
    """Resize ``model`` in place to ``widths`` and the tensor shapes of ``state_dict``.

    ``widths`` is validated first (:func:`check_widths`); nothing is changed when it is invalid.
    Every parameter or buffer whose shape differs from the state dict is then replaced by an
    uninitialised tensor of the stored shape on the same device (the following
    ``load_state_dict`` fills it), and :func:`check_layer_shapes` verifies that attributes and
    shapes agree. Returns the model.
    """
    clean = check_widths(model, widths, where)
    modules = dict(model.named_modules())
    for name, attrs in clean.items():
        for k, v in attrs.items():
            setattr(modules[name], k, v)
    for mod_name, m in modules.items():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(m.named_parameters(recurse=False)):
            t = state_dict.get(prefix + pname)
            if isinstance(t, torch.Tensor) and t.shape != p.shape:
                if t.dim() != p.dim():
                    raise ModelFileError(f"{where}: tensor {prefix + pname} has shape {tuple(t.shape)}, architecture "
                                         f"{type(model).__name__} needs {p.dim()} dimensions ({tuple(p.shape)})")
                setattr(m, pname, nn.Parameter(torch.empty(t.shape, dtype=p.dtype, device=p.device),
                                               requires_grad=p.requires_grad))
        for bname, b in list(m.named_buffers(recurse=False)):
            t = state_dict.get(prefix + bname)
            if b is not None and isinstance(t, torch.Tensor) and t.shape != b.shape:
                if t.dim() != b.dim():
                    raise ModelFileError(f"{where}: tensor {prefix + bname} has shape {tuple(t.shape)}, architecture "
                                         f"{type(model).__name__} needs {b.dim()} dimensions ({tuple(b.shape)})")
                m.register_buffer(bname, torch.empty(t.shape, dtype=b.dtype, device=b.device))
    check_layer_shapes(model, where)
    return model


def _shape(t) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def check_layer_shapes(model: nn.Module, where: str = "the model file") -> None:
    """Every known layer's structural attributes agree with its tensors' shapes (and with each other)."""

    def bad(name: str, msg: str) -> ModelFileError:
        return ModelFileError(f"{where}: layer {name!r}: {msg}; the widths disagree with the tensor shapes "
                              "(the file is corrupt or was edited)")

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):  # noqa: SLF001
            o, i, g = m.out_channels, m.in_channels, m.groups
            if o % g or i % g:
                raise bad(name, f"groups={g} does not divide in_channels={i} and out_channels={o}")
            want = (i, o // g, *m.kernel_size) if m.transposed else (o, i // g, *m.kernel_size)
            if _shape(m.weight) != want:
                raise bad(name, f"weight has shape {_shape(m.weight)}, expected {want}")
            if m.bias is not None and _shape(m.bias) != (o,):
                raise bad(name, f"bias has shape {_shape(m.bias)}, expected ({o},)")
        elif isinstance(m, nn.Linear):
            if _shape(m.weight) != (m.out_features, m.in_features):
                raise bad(name, f"weight has shape {_shape(m.weight)}, expected {(m.out_features, m.in_features)}")
            if m.bias is not None and _shape(m.bias) != (m.out_features,):
                raise bad(name, f"bias has shape {_shape(m.bias)}, expected ({m.out_features},)")
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # noqa: SLF001
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None and _shape(t) != (m.num_features,):
                    raise bad(name, f"a tensor has shape {_shape(t)}, expected ({m.num_features},)")
        elif isinstance(m, nn.LayerNorm):
            for t in (m.weight, m.bias):
                if t is not None and _shape(t) != tuple(m.normalized_shape):
                    raise bad(name, f"a tensor has shape {_shape(t)}, expected {tuple(m.normalized_shape)}")
        elif isinstance(m, nn.GroupNorm):
            if m.num_channels % m.num_groups:
                raise bad(name, f"num_groups={m.num_groups} does not divide num_channels={m.num_channels}")
            for t in (m.weight, m.bias):
                if t is not None and _shape(t) != (m.num_channels,):
                    raise bad(name, f"a tensor has shape {_shape(t)}, expected ({m.num_channels},)")
        elif isinstance(m, nn.MultiheadAttention):
            e, h = m.embed_dim, m.num_heads
            if h * m.head_dim != e:
                raise bad(name, f"num_heads={h} x head_dim={m.head_dim} is not embed_dim={e}")
            if m._qkv_same_embed_dim:  # noqa: SLF001
                if (m.kdim, m.vdim) != (e, e) or _shape(m.in_proj_weight) != (3 * e, e):
                    raise bad(name, f"in_proj_weight has shape {_shape(m.in_proj_weight)}, expected {(3 * e, e)} "
                              f"(kdim={m.kdim}, vdim={m.vdim})")
            elif _shape(m.q_proj_weight) != (e, e) or _shape(m.k_proj_weight) != (e, m.kdim) \
                    or _shape(m.v_proj_weight) != (e, m.vdim):
                raise bad(name, "the q/k/v projections do not fit embed_dim, kdim and vdim")
            if m.in_proj_bias is not None and _shape(m.in_proj_bias) != (3 * e,):
                raise bad(name, f"in_proj_bias has shape {_shape(m.in_proj_bias)}, expected ({3 * e},)")
            if m.out_proj.in_features != e or m.out_proj.out_features != e:
                raise bad(name, f"out_proj is {m.out_proj.in_features} -> {m.out_proj.out_features}, expected {e} -> {e}")
        if isinstance(m, SelfAttention):
            q = m.qkv.out_features
            if q % (3 * m.num_heads) or q // (3 * m.num_heads) < 1:
                raise bad(name, f"qkv has {q} outputs, not 3 x num_heads ({m.num_heads}) x a head size")
            if m.proj.in_features != q // 3:
                raise bad(name, f"proj takes {m.proj.in_features} inputs, qkv gives {q // 3}")
        whole = WHOLE_ATTENTION.get(f"{type(m).__module__}.{type(m).__qualname__}")
        if whole is not None:  # Swin / MaxViT attention: q/k/v width = input width = heads x head size
            qkv, out = getattr(m, whole[0]), getattr(m, whole[1])
            c, h = qkv.in_features, getattr(m, whole[2])
            if qkv.out_features != 3 * c or c % h or (out.in_features, out.out_features) != (c, c):
                raise bad(name, f"{whole[0]} is {c} -> {qkv.out_features} and {whole[1]} {out.in_features} -> "
                          f"{out.out_features} with {h} heads; expected C -> 3C and C -> C, C a multiple of the heads")
            if whole[3] is not None and getattr(m, whole[3]) * h != c:
                raise bad(name, f"{whole[3]}={getattr(m, whole[3])} x {h} heads is not the width {c}")
        hd = getattr(m, "hidden_dim", None) if "hidden_dim" in _model_attrs(m) else None
        if hd is not None:
            for t, dim in ((getattr(m, "class_token", None), -1),
                           (getattr(getattr(m, "conv_proj", None), "weight", None), 0)):
                if isinstance(t, torch.Tensor) and t.shape[dim] != hd:
                    raise bad(name, f"hidden_dim={hd} but a tensor has shape {_shape(t)}")
