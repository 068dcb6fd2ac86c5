"""The parameter-free operations the tracer may follow, by kind: an explicit allow-list.

A traced value carries its channels in one dimension (:class:`~metaprune.graph.rules.Flow`). An
operation without parameters either keeps channel ``c`` at channel ``c`` (activations, dropout,
pooling over other dimensions, scalar arithmetic), moves the channel dimension (reshape, permute,
indexing), or merges two channel tensors (``+``, ``-``, ``*``, ``cat``). Anything the tracer does
not find here is refused with a :class:`~metaprune.errors.GraphError` naming the operation: a
shape-preserving operation such as ``flip(1)``, ``roll(.., dims=1)`` or ``nn.ChannelShuffle``
reorders channels, and treating it as the identity would map the weights silently wrong.

Functions are matched by identity (``torch.relu`` is not "anything called relu"), modules by type
(an ``nn.Flatten`` works whatever its attribute name), Tensor methods by name. Extend with
:func:`register_channel_op` (``kind`` one of :data:`KINDS`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

#: ``elementwise``: same shape out, channel c stays c (other arguments must not be tensors);
#: ``arith``: + - * / (scalars: elementwise; two channel tensors: a merge node; a parameter: an
#: embedding); ``pool1d`` / ``pool2d``: pools over the last 1 / 2 dims; ``reduce``: mean/sum/amax/amin
#: over explicit dims; ``softmax``: over one dim; ``flip`` / ``roll``: over explicit dims; ``flatten``,
#: ``unflatten``, ``squeeze``, ``unsqueeze``, ``reshape``, ``permute``, ``transpose``, ``expand``,
#: ``getitem``, ``cat``: move the channel dim (or join channel tensors for ``cat``); ``spatial``: acts on
#: dims 2.. of an (N, C, ...) tensor (interpolation); ``pad``: ``F.pad`` of the last dims; ``constant``: a new
#: tensor shaped like its input (``zeros_like``, ``new_zeros``): no channels (refused if later merged);
#: ``split``: ``chunk`` / ``split`` into parts (along the channels: new nodes per part).
KINDS = ("elementwise", "arith", "split", "pool1d", "pool2d", "reduce", "softmax", "flip", "roll", "flatten", "unflatten",
         "squeeze", "unsqueeze", "reshape", "permute", "transpose", "expand", "getitem", "cat", "spatial", "pad",
         "constant")

_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
MODULE_KINDS: dict[type, str] = {t: "elementwise" for t in _ELEMENTWISE_MODULES}
MODULE_KINDS.update({
    nn.MaxPool1d: "pool1d", nn.AvgPool1d: "pool1d", nn.AdaptiveAvgPool1d: "pool1d", nn.AdaptiveMaxPool1d: "pool1d",
    nn.MaxPool2d: "pool2d", nn.AvgPool2d: "pool2d", nn.AdaptiveAvgPool2d: "pool2d", nn.AdaptiveMaxPool2d: "pool2d",
    nn.Flatten: "flatten", nn.Unflatten: "unflatten", nn.Softmax: "softmax", nn.LogSoftmax: "softmax",
    nn.ZeroPad2d: "pool2d", nn.ConstantPad2d: "pool2d", nn.ReflectionPad2d: "pool2d", nn.ReplicationPad2d: "pool2d",
    nn.Upsample: "spatial", nn.UpsamplingNearest2d: "spatial", nn.UpsamplingBilinear2d: "spatial",
})
try:  # torchvision's per-sample stochastic depth scales whole samples: channels stay in place
    from torchvision.ops import StochasticDepth

    MODULE_KINDS[StochasticDepth] = "elementwise"
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass

FUNCTION_KINDS: dict[object, str] = {f: "elementwise" for f in (
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, torch.clamp, torch.clip, torch.abs, torch.neg,
    torch.exp, torch.sqrt, torch.rsqrt, torch.square, torch.erf, operator.neg, operator.pos)}
FUNCTION_KINDS.update({f: "arith" for f in (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide)})
FUNCTION_KINDS.update({
    F.max_pool1d: "pool1d", F.avg_pool1d: "pool1d", F.adaptive_avg_pool1d: "pool1d", F.adaptive_max_pool1d: "pool1d",
    F.max_pool2d: "pool2d", F.avg_pool2d: "pool2d", F.adaptive_avg_pool2d: "pool2d", F.adaptive_max_pool2d: "pool2d",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce", torch.amin: "reduce",
    F.softmax: "softmax", F.log_softmax: "softmax", torch.softmax: "softmax", torch.log_softmax: "softmax",
    torch.flip: "flip", torch.roll: "roll", torch.flatten: "flatten", torch.unflatten: "unflatten",
    torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.permute: "permute",
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
    operator.getitem: "getitem", torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    F.interpolate: "spatial", F.pad: "pad", torch.chunk: "split", torch.split: "split",
})
FUNCTION_KINDS.update({f: "constant" for f in (
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.randint_like)})

METHOD_KINDS: dict[str, str] = {m: "elementwise" for m in (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "abs", "neg",
    "exp", "sqrt", "rsqrt", "square", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to")}
METHOD_KINDS.update({m: "arith" for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")})
METHOD_KINDS.update({
    "mean": "reduce", "sum": "reduce", "amax": "reduce", "amin": "reduce", "softmax": "softmax",
    "log_softmax": "softmax", "flip": "flip", "roll": "roll", "flatten": "flatten", "unflatten": "unflatten",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "reshape": "reshape", "view": "reshape", "permute": "permute",
    "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "expand": "expand",
    "chunk": "split", "split": "split",
})
METHOD_KINDS.update({m: "constant" for m in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")})

#: arithmetic operations by merge kind (the names the tracer reports)
MERGE_KIND = {"add": "add", "iadd": "add", "add_": "add", "sub": "sub", "isub": "sub", "sub_": "sub",
              "subtract": "sub", "mul": "mul", "imul": "mul", "mul_": "mul", "multiply": "mul"}
#: operations that change their first argument in place
INPLACE = {"iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_", "setitem"}


def register_channel_op(target: object, kind: str) -> None:
    """Allow ``target`` (a module type, a function, or a Tensor method name) as a parameter-free
    operation of ``kind`` (see :data:`KINDS`); e.g. ``register_channel_op(MyAct, "elementwise")``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    if isinstance(target, str):
        METHOD_KINDS[target] = kind
    elif isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_KINDS[target] = kind
    else:
        FUNCTION_KINDS[target] = kind


_TIMM_DONE = False


def _timm_ops() -> None:
    """timm's activation and drop modules (channel-wise: channel c out depends on channel c in only),
    registered on first sight of a timm module (importing timm is slow, so not at import time)."""
    global _TIMM_DONE
    _TIMM_DONE = True
    try:
        from timm.layers import activations as ta
        from timm.layers.drop import DropBlock2d, DropPath
    except ImportError:  # pragma: no cover - a timm without these modules
        return
    # DropPath zeroes whole samples, DropBlock2d spatial blocks of each channel: neither mixes channels
    names = ("Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh",
             "QuickGELU")
    for t in (*(getattr(ta, n, None) for n in names), DropPath, DropBlock2d):
        if t is not None:
            MODULE_KINDS.setdefault(t, "elementwise")


def _maybe_timm(module: nn.Module) -> None:
    if not _TIMM_DONE and type(module).__module__.startswith("timm."):
        _timm_ops()


def lookup_type(table: dict[type, object], module: nn.Module) -> object | None:
    """``table``'s entry for ``module``'s type (nearest registered base class), or None. A subclass
    that overrides ``forward`` computes something else than the registered type: None."""
    _maybe_timm(module)
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls] if type(module).forward is cls.forward else None
    return None


def module_kind(module: nn.Module) -> str | None:
    """The kind of a parameter-free module, by type (:func:`lookup_type`), or None. A subclass that
    overrides ``forward`` is not the registered operation: it gets None (and is traced through, or
    refused if it is a ``torch.nn`` leaf)."""
    return lookup_type(MODULE_KINDS, module)


def function_kind(fn: object) -> str | None:
    """The kind of a traced function (matched by identity), or None."""
    try:
        return FUNCTION_KINDS.get(fn)
    except TypeError:  # unhashable target
        return None


__all__ = ["FUNCTION_KINDS", "INPLACE", "KINDS", "MERGE_KIND", "METHOD_KINDS", "MODULE_KINDS", "function_kind",
           "module_kind", "register_channel_op"]
