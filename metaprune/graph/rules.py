"""Encode rules, one per layer type. Adding a layer type to the graph means adding one rule here.

A rule receives the :class:`Flow` (node set + channel dimension) of the layer's input and
declares on the :class:`~metaprune.graph.builder.GraphBuilder` the nodes it creates, the edges
that carry its weights and the node slots that carry its per-channel vectors. It returns the
flow of its output. Decoding needs no per-type code: every declaration is recorded in the
layout that :func:`metaprune.graph.graph_params` inverts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.errors import GraphError
from metaprune.graph.builder import GraphBuilder, NodeSet
from metaprune.graph.graph import SLOT
from metaprune.graph.ops import lookup_type, module_kind
from metaprune.models.layers import SelfAttention


@dataclass
class Flow:
    """Which graph nodes the channels of a tensor are, and which dimension holds the channels."""

    ns: NodeSet
    cdim: int
    #: >1 after flattening (N, C, H, W) to (N, C*H*W): channel c is the ``inner`` entries
    #: ``[c*inner, (c+1)*inner)`` of dim ``cdim`` (only a Linear may read such a flow)
    inner: int = 1
    #: after a reshape that splits the channels over several dims (a channel shuffle's ``view``): one
    #: ``(dim, size, axis)`` per dim, ``axis`` its place in the original row-major split; ``cdim`` unused
    grid: tuple[tuple[int, int, int], ...] | None = None

    @property
    def plain(self) -> bool:
        """The channels are one dim of the tensor (neither flattened with positions nor split)."""
        return self.inner == 1 and self.grid is None


Rule = Callable[[GraphBuilder, str, nn.Module, Flow, torch.Tensor], object]
RULES: dict[type, Rule] = {}


def register_rule(*types: type) -> Callable[[Rule], Rule]:
    """Register ``fn(builder, module_path, module, input_flow, input_meta) -> output flow`` for ``types``."""

    def deco(fn: Rule) -> Rule:
        for t in types:
            RULES[t] = fn
        return fn

    return deco


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type (or its nearest registered base class). A subclass that
    overrides ``forward`` computes something else: no rule (it is traced through instead)."""
    if not _TIMM_DONE and type(module).__module__.startswith("timm."):
        _timm_rules()
    return lookup_type(RULES, module)


def supported_types() -> str:
    """Names of the layer types that have a rule (for error messages)."""
    return ", ".join(sorted({t.__name__ if not t.__module__.startswith("timm.") else f"timm {t.__name__}"
                             for t in RULES}))


def _key(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _kernel_group(kh: int, kw: int) -> str:
    return f"k{kh * kw}" if kh == kw else f"k{kh}x{kw}"


def _expect(cond: bool, name: str, mod: nn.Module, what: str) -> None:
    if not cond:
        raise GraphError(f"{name} ({type(mod).__name__}): {what}; the graph cannot map its channels")


def _plain(x: Flow, name: str, mod: nn.Module) -> None:
    _expect(x.grid is None, name, mod, "its input has its channels split over several dims")
    _expect(x.inner == 1, name, mod, f"its input holds {x.inner} values per channel (a flattened feature map)")


def _norm_nodes(b: GraphBuilder, name: str, mod: nn.Module, flow: Flow, slots: list[int]) -> NodeSet:
    """The nodes a norm layer writes its vectors to: the input's nodes if their slots are free,
    else new nodes joined one-to-one to them (two norms reading the same channels)."""
    if not flow.ns.used_slots.intersection(slots):
        return flow.ns
    layer = b.new_layer(name, type(mod).__name__)
    ns = b.new_nodes(flow.ns.size, "norm", flow.ns.depth + 1, layer)
    b.identity_edges(flow.ns, ns, layer)
    return ns


@register_rule(nn.Conv2d)
def conv2d(b: GraphBuilder, name: str, mod: nn.Conv2d, x: Flow, meta: torch.Tensor) -> Flow:
    """Conv2d (grouped and depthwise included): one node per output channel; one edge per
    (input, output) pair of a group with the kernel slice as feature; bias in slot ``bias``."""
    _plain(x, name, mod)
    _expect(x.cdim == 1 and x.ns.size == mod.in_channels, name, mod,
            f"expects {mod.in_channels} channels in dim 1, gets {x.ns.size} in dim {x.cdim}")
    kh, kw = mod.kernel_size
    layer = b.new_layer(name, "Conv2d")
    out = b.new_nodes(mod.out_channels, "conv", x.ns.depth + 1, layer)
    w = mod.weight.detach()
    value = w.reshape(-1, kh * kw)
    role = "patch" if tuple(mod.stride) == (kh, kw) and kh > 1 else ("grouped_conv" if mod.groups > 1 else "conv")
    group = _kernel_group(kh, kw)
    if mod.groups == 1:
        b.dense_edges(group, x.ns, out, value, role, layer, key=_key(name, "weight"), shape=list(w.shape),
                      dtype=w.dtype)
    else:
        b.grouped_edges(group, x.ns, out, mod.groups, value, role, layer, key=_key(name, "weight"),
                        shape=list(w.shape), dtype=w.dtype)
    if mod.bias is not None:
        b.node_param(_key(name, "bias"), mod.bias, out, [SLOT["bias"]])
    return Flow(out, 1)


@register_rule(nn.Linear)
def linear(b: GraphBuilder, name: str, mod: nn.Linear, x: Flow, meta: torch.Tensor) -> Flow:
    """Linear: one node per output feature, one 1-feature edge per weight, bias in slot ``bias``.
    After a flatten of (N, C, H, W) (``x.inner == H*W``) it is a convolution with an HxW kernel over
    an HxW map: one edge per (channel, output) with the ``H*W`` weights as feature (group ``k{H*W}``)."""
    _expect(x.grid is None, name, mod, "its input has its channels split over several dims")
    _expect(x.cdim == meta.ndim - 1 or x.inner != 1 or meta.shape[-1] != mod.in_features, name, mod,
            f"it mixes the {mod.in_features} entries of the last dim, which are positions (tokens), not channels "
            f"(the {x.ns.size} channels are in dim {x.cdim} of {meta.ndim}; e.g. ResMLP's cross-patch Linear); the "
            "graph encodes layers over channels only")
    _expect(x.cdim == meta.ndim - 1 and x.ns.size * x.inner == mod.in_features, name, mod,
            f"expects {mod.in_features} features in the last dim, gets {x.ns.size * x.inner} in dim {x.cdim} of "
            f"{meta.ndim}")
    layer = b.new_layer(name, "Linear")
    out = b.new_nodes(mod.out_features, "linear", x.ns.depth + 1, layer)
    w = mod.weight.detach()
    b.dense_edges(f"k{x.inner}", x.ns, out, w.reshape(-1, x.inner), "linear", layer, key=_key(name, "weight"),
                  shape=list(w.shape), dtype=w.dtype)
    if mod.bias is not None:
        b.node_param(_key(name, "bias"), mod.bias, out, [SLOT["bias"]])
    return Flow(out, meta.ndim - 1)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def batchnorm(b: GraphBuilder, name: str, mod: nn.modules.batchnorm._BatchNorm, x: Flow, meta: torch.Tensor) -> Flow:
    """BatchNorm: weight, bias, running mean and var in slots 0-3 of the channels it normalises;
    ``num_batches_tracked`` is kept as a constant in the spec."""
    _plain(x, name, mod)
    _expect(x.cdim == 1 and x.ns.size == mod.num_features, name, mod,
            f"expects {mod.num_features} channels in dim 1, gets {x.ns.size} in dim {x.cdim}")
    ns = _norm_nodes(b, name, mod, x, [0, 1, 2, 3])
    for attr, slot in (("weight", "bn_weight"), ("bias", "bn_bias"), ("running_mean", "bn_mean"),
                       ("running_var", "bn_var")):
        t = getattr(mod, attr)
        if t is not None:
            b.node_param(_key(name, attr), t, ns, [SLOT[slot]])
    if mod.num_batches_tracked is not None:
        b.constant(_key(name, "num_batches_tracked"), mod.num_batches_tracked)
    return Flow(ns, x.cdim)


def _affine_norm(b: GraphBuilder, name: str, mod: nn.Module, x: Flow) -> Flow:
    ns = _norm_nodes(b, name, mod, x, [SLOT["ln_weight"], SLOT["ln_bias"]])
    if getattr(mod, "weight", None) is not None:
        b.node_param(_key(name, "weight"), mod.weight, ns, [SLOT["ln_weight"]])
    if getattr(mod, "bias", None) is not None:
        b.node_param(_key(name, "bias"), mod.bias, ns, [SLOT["ln_bias"]])
    return Flow(ns, x.cdim)


@register_rule(nn.LayerNorm)
def layernorm(b: GraphBuilder, name: str, mod: nn.LayerNorm, x: Flow, meta: torch.Tensor) -> Flow:
    """LayerNorm over the channel dimension: weight and bias in slots ``ln_weight`` / ``ln_bias``."""
    _plain(x, name, mod)
    _expect(tuple(mod.normalized_shape) == (x.ns.size,) and x.cdim == meta.ndim - 1, name, mod,
            f"normalises {tuple(mod.normalized_shape)}, but the channels are {x.ns.size} in dim {x.cdim}")
    return _affine_norm(b, name, mod, x)


@register_rule(nn.GroupNorm)
def groupnorm(b: GraphBuilder, name: str, mod: nn.GroupNorm, x: Flow, meta: torch.Tensor) -> Flow:
    """GroupNorm over the channels in dim 1: weight and bias in slots ``ln_weight`` / ``ln_bias``
    (the number of groups is a structural attribute, kept with the widths)."""
    _plain(x, name, mod)
    _expect(x.cdim == 1 and x.ns.size == mod.num_channels, name, mod,
            f"expects {mod.num_channels} channels in dim 1, gets {x.ns.size} in dim {x.cdim}")
    return _affine_norm(b, name, mod, x)


def layernorm2d(b: GraphBuilder, name: str, mod: nn.LayerNorm, x: Flow, meta: torch.Tensor) -> Flow:
    """A channels-first LayerNorm (torchvision's and timm's ``LayerNorm2d``: permute, layer_norm over C,
    permute back): a LayerNorm over the channels in dim 1 of (N, C, H, W)."""
    _plain(x, name, mod)
    _expect(tuple(mod.normalized_shape) == (x.ns.size,) and x.cdim == 1 and meta.ndim == 4, name, mod,
            f"normalises {tuple(mod.normalized_shape)} over dim 1, but the channels are {x.ns.size} in dim "
            f"{x.cdim} of {meta.ndim}")
    return _affine_norm(b, name, mod, x)


try:  # torchvision's channels-first LayerNorm (ConvNeXt)
    from torchvision.models.convnext import LayerNorm2d

    register_rule(LayerNorm2d)(layernorm2d)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


def _qkv_attention(b: GraphBuilder, x: Flow, w: torch.Tensor, bias: torch.Tensor | None,
                   proj: nn.Linear, qkv_key: str, bias_key: str, proj_key: str, type_: str) -> Flow:
    hd, c = w.shape[0] // 3, w.shape[1]
    lq = b.new_layer(qkv_key.removesuffix(".weight"), f"{type_}.qkv")
    att = b.new_nodes(hd, "attention", x.ns.depth + 1, lq)
    w = w.detach()
    b.dense_edges("qkv3", x.ns, att, w.reshape(3, hd, c).permute(1, 2, 0).reshape(hd * c, 3), "qkv", lq,
                  key=qkv_key, view="qkv", shape=list(w.shape), dtype=w.dtype)
    if bias is not None:
        b.node_param(bias_key, bias, att, [SLOT["q_bias"], SLOT["k_bias"], SLOT["v_bias"]])
    lp = b.new_layer(proj_key, f"{type_}.proj")
    out = b.new_nodes(proj.out_features, "linear", x.ns.depth + 2, lp)
    wp = proj.weight.detach()
    b.dense_edges("k1", att, out, wp.reshape(-1, 1), "attn_out", lp, key=_key(proj_key, "weight"),
                  shape=list(wp.shape), dtype=wp.dtype)
    if proj.bias is not None:
        b.node_param(_key(proj_key, "bias"), proj.bias, out, [SLOT["bias"]])
    return Flow(out, x.cdim)


@register_rule(SelfAttention)
def self_attention(b: GraphBuilder, name: str, mod: SelfAttention, x: Flow, meta: torch.Tensor):
    """Multi-head self-attention: one node per query/key/value dimension j (heads side by side)
    whose edges to the input carry the 3 features (W_q[j,i], W_k[j,i], W_v[j,i]) (group ``qkv3``)
    and whose slots ``q/k/v_bias`` hold the biases; then ``proj`` as a linear layer (role ``attn_out``)."""
    _plain(x, name, mod)
    c = mod.qkv.in_features
    _expect(x.cdim == meta.ndim - 1 and x.ns.size == c, name, mod,
            f"expects {c} features in the last dim, gets {x.ns.size} in dim {x.cdim}")
    hd = mod.qkv.out_features // 3
    _expect(hd * 3 == mod.qkv.out_features and hd % mod.num_heads == 0, name, mod,
            f"qkv has {mod.qkv.out_features} outputs, not 3 x num_heads ({mod.num_heads}) x head_dim")
    return (_qkv_attention(b, x, mod.qkv.weight, mod.qkv.bias, mod.proj, _key(name, "qkv.weight"),
                           _key(name, "qkv.bias"), _key(name, "proj"), "SelfAttention"), None)


@register_rule(nn.MultiheadAttention)
def multihead_attention(b: GraphBuilder, name: str, mod: nn.MultiheadAttention, x: Flow, meta: torch.Tensor):
    """``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor, which
    the tracer checks): encoded as :func:`self_attention` (``in_proj_weight`` in group ``qkv3``,
    ``in_proj_bias`` in slots ``q/k/v_bias``, ``out_proj`` with role ``attn_out``). Returns
    ``(output, None)``: the attention weights carry no channels."""
    _plain(x, name, mod)
    e = mod.embed_dim
    _expect(mod._qkv_same_embed_dim and mod.in_proj_weight is not None, name, mod,
            "has separate query/key/value projections (kdim/vdim differ from embed_dim); unsupported")
    _expect(mod.bias_k is None and mod.bias_v is None and not mod.add_zero_attn, name, mod,
            "uses add_bias_kv or add_zero_attn; unsupported")
    _expect(x.cdim == meta.ndim - 1 and x.ns.size == e, name, mod,
            f"expects {e} features in the last dim, gets {x.ns.size} in dim {x.cdim}")
    return (_qkv_attention(b, x, mod.in_proj_weight, mod.in_proj_bias, mod.out_proj,
                           _key(name, "in_proj_weight"), _key(name, "in_proj_bias"), _key(name, "out_proj"),
                           "MultiheadAttention"), None)


# ----------------------------------------------------------------- timm (optional; registered lazily)
def _norm_act(norm: Rule) -> Rule:
    """timm's ``*NormAct*`` layers (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``, ...): the
    norm, then ``self.drop`` and ``self.act``. Encoded as the norm (the same nodes and slots); the drop and
    activation must be channel-wise operations (:mod:`metaprune.graph.ops`), which keep the channels in place
    as they do after a plain norm layer; anything else (an activation with parameters, e.g. PReLU) is refused."""

    def rule(b: GraphBuilder, name: str, mod: nn.Module, x: Flow, meta: torch.Tensor) -> Flow:
        for attr in ("drop", "act"):
            sub = getattr(mod, attr, None)
            _expect(sub is not None and module_kind(sub) == "elementwise", name, mod,
                    f"its {attr} ({type(sub).__name__}) is not a known channel-wise operation (it may have "
                    "parameters or mix channels)")
        return norm(b, name, mod, x, meta)

    rule.__doc__ = f"{norm.__name__} followed by a channel-wise drop and activation (timm)"
    return rule


def affine(b: GraphBuilder, name: str, mod: nn.Module, x: Flow, meta: torch.Tensor) -> Flow:
    """timm's ``Affine`` (ResMLP: ``beta + alpha * x`` with ``alpha``, ``beta`` of shape ``(1, 1, C)``, channels
    last): a layer scale plus a bias. New nodes (role ``linear``) with one edge per channel carrying ``alpha[c]``
    (group ``k1``, a diagonal 1x1 layer, as a layer scale is encoded) and ``beta`` in slot ``bias``."""
    _plain(x, name, mod)
    c = x.ns.size
    for attr in ("alpha", "beta"):
        p = getattr(mod, attr)
        _expect(p.numel() == c and p.shape[-1] == c and x.cdim == meta.ndim - 1, name, mod,
                f"its {attr} of shape {tuple(p.shape)} is not one value per channel of {c} in the last dim "
                f"(the channels are in dim {x.cdim} of {meta.ndim})")
    layer = b.new_layer(name, "Affine")
    ns = b.new_nodes(c, "linear", x.ns.depth + 1, layer)
    a = mod.alpha.detach()
    b.diag_edges("k1", x.ns, ns, a.reshape(-1, 1), "linear", layer, key=_key(name, "alpha"), shape=list(a.shape),
                 dtype=a.dtype)
    b.node_param(_key(name, "beta"), mod.beta, ns, [SLOT["bias"]])
    return Flow(ns, x.cdim)


def timm_attention(b: GraphBuilder, name: str, mod: nn.Module, x: Flow, meta: torch.Tensor) -> Flow:
    """timm's ViT ``Attention`` (``forward(x, attn_mask=None, is_causal=False)``: fused ``qkv`` Linear with rows
    ``[q; k; v]`` of ``num_heads * head_dim`` each, ``proj``): encoded as :func:`self_attention` (group ``qkv3``,
    slots ``q/k/v_bias``, ``proj`` with role ``attn_out``). A mask tensor is refused by the tracer (a second
    input); q/k normalisation, a scale norm or a gate have no encoding and are refused."""
    _plain(x, name, mod)
    c = mod.qkv.in_features
    _expect(x.cdim == meta.ndim - 1 and x.ns.size == c, name, mod,
            f"expects {c} features in the last dim, gets {x.ns.size} in dim {x.cdim}")
    for attr in ("q_norm", "k_norm", "norm"):
        _expect(isinstance(getattr(mod, attr, nn.Identity()), nn.Identity), name, mod,
                f"normalises inside the attention ({attr}: {type(getattr(mod, attr)).__name__}); unsupported")
    _expect(getattr(mod, "gate", None) is None, name, mod, "has an output gate; unsupported")
    hd = mod.qkv.out_features // 3
    _expect(hd * 3 == mod.qkv.out_features and hd == mod.num_heads * mod.head_dim, name, mod,
            f"qkv has {mod.qkv.out_features} outputs, not 3 x num_heads ({mod.num_heads}) x head_dim "
            f"({mod.head_dim})")
    return _qkv_attention(b, x, mod.qkv.weight, mod.qkv.bias, mod.proj, _key(name, "qkv.weight"),
                          _key(name, "qkv.bias"), _key(name, "proj"), "Attention")


def conv_mlp(b: GraphBuilder, name: str, mod: nn.Module, x: Flow, meta: torch.Tensor) -> Flow:
    """timm VGG's ``ConvMlp`` (``pre_logits``): ``fc1`` (a KxK conv), ``act1``, ``drop``, ``fc2`` (1x1), ``act2``,
    after an adaptive average pool when the map is smaller than K (a branch on the input's shape, which
    torch.fx cannot trace; the pool acts on each channel alone, so the channels are those of its input).
    Encoded as its two convolutions."""
    for attr in ("act1", "drop", "act2"):
        sub = getattr(mod, attr, None)
        _expect(sub is not None and module_kind(sub) == "elementwise", name, mod,
                f"its {attr} ({type(sub).__name__}) is not a known channel-wise operation")
    for attr in ("fc1", "fc2"):
        _expect(type(getattr(mod, attr, None)) is nn.Conv2d, name, mod,
                f"its {attr} is a {type(getattr(mod, attr, None)).__name__}, not an nn.Conv2d")
    h = conv2d(b, _key(name, "fc1"), mod.fc1, x, meta)
    return conv2d(b, _key(name, "fc2"), mod.fc2, h, meta)


_TIMM_DONE = False


def _timm_rules() -> None:
    """Register the rules for timm's layers, on first sight of a timm module (importing timm is slow)."""
    global _TIMM_DONE
    _TIMM_DONE = True
    try:
        from timm.layers import norm as tn
        from timm.layers import norm_act as tna
    except ImportError:  # pragma: no cover - a timm without these modules
        return

    def reg(mod: object, cls: str, rule: Rule) -> None:
        t = getattr(mod, cls, None)
        if isinstance(t, type):
            RULES.setdefault(t, rule)

    try:
        from timm.layers.linear import Linear
        RULES.setdefault(Linear, linear)  # F.linear(x, weight, bias) outside TorchScript
    except ImportError:  # pragma: no cover
        pass
    reg(tn, "LayerNorm2d", layernorm2d)
    reg(tn, "LayerNorm", layernorm)
    reg(tn, "GroupNorm", groupnorm)
    reg(tn, "GroupNorm1", groupnorm)
    reg(tna, "BatchNormAct2d", _norm_act(batchnorm))
    reg(tna, "GroupNormAct", _norm_act(groupnorm))
    reg(tna, "GroupNorm1Act", _norm_act(groupnorm))
    reg(tna, "LayerNormAct", _norm_act(layernorm))
    reg(tna, "LayerNormAct2d", _norm_act(layernorm2d))
    try:
        from timm.layers.attention import Attention
        RULES.setdefault(Attention, timm_attention)
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.models.vgg import ConvMlp
        RULES.setdefault(ConvMlp, conv_mlp)
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.models.mlp_mixer import Affine
        RULES.setdefault(Affine, affine)
    except ImportError:  # pragma: no cover
        pass
