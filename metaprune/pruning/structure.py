"""What the pruning engine must know about a model: protected layers, attention heads,
bare parameters, and the attributes to write back after channels were removed."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError, PruningError
from metaprune.models.widths import WHOLE_ATTENTION

#: layers whose output channels are their own (a model output they produce keeps its width only if they do)
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.MultiheadAttention, nn.RNNBase)


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the logits: the last ``nn.Linear`` whose width is the number of
    classes (else the last Linear, else the last Conv2d). Its outputs are never pruned."""
    num_classes = getattr(model, "metaprune_arch", {}).get("args", {}).get("num_classes")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if num_classes is not None:
        match = [(n, m) for n, m in linears if m.out_features == num_classes]
        if match:
            return match[-1]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    return convs[-1]


def resolve_ignored(model: nn.Module, names: tuple[str, ...] | list[str], classifier: bool = True) -> list[nn.Module]:
    """Module instances for user-given layer names, plus the classifier (unless ``classifier=False``:
    ``keep_output`` protects the layers that produce the outputs instead). Unknown names raise an
    error with the closest valid names."""
    modules = dict(model.named_modules())
    out = [find_classifier(model)[1]] if classifier else []
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--ignore {name!r}: the model has no layer of that name{hint} "
                              "(names are module paths as in model.named_modules(), e.g. layer1.0.conv1)")
        out.append(modules[name])
    return out


def ignored_layers(model: nn.Module, config) -> list[nn.Module]:
    """The layers a :class:`~metaprune.pruning.config.PruneConfig` leaves whole: ``config.ignore``, the
    classifier (unless ``keep_output``, whose output layers ``prune()`` adds to ``ignore``) and, with
    ``prune_heads=False``, the attention ``qkv`` layers and every ``nn.MultiheadAttention`` (its embedding
    width is its head count times its head size)."""
    ignored = resolve_ignored(model, config.ignore, classifier=not config.keep_output)
    if not config.prune_heads:  # attention keeps its heads and head size
        ignored += [a.qkv for a in attention_layers(model)] + mha_layers(model) + \
            [m for m in model.modules() if _whole_attention(m) is not None]
    return ignored


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules whose heads can be removed whole: a fused ``qkv`` Linear plus an integer
    ``num_heads`` (``metaprune.models.SelfAttention`` and timm-style attention); not torchvision's Swin
    window attention, which is pruned as one layer (head size only, :class:`WholeAttentionPruner`)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
            and _whole_attention(m) is None]


def mha_layers(model: nn.Module) -> list[nn.MultiheadAttention]:
    """``torch.nn.MultiheadAttention`` modules (torchvision's ViT): their ``embed_dim`` is the residual width
    *and* ``num_heads x head_dim``, so torch-pruning can shrink only the head size, the same in every head."""
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def channel_groups(model: nn.Module) -> dict[nn.Module, int]:
    """torch-pruning's ``out_channel_groups`` for layers whose channels come in equal groups it does not
    detect itself: every ``nn.MultiheadAttention`` splits its embedding into ``num_heads`` heads, so its
    group (the ViT residual stream) loses the same head-size positions in every head and ``embed_dim``
    stays ``num_heads x head_dim``; torch-pruning alone removes any channels, leaving an ``embed_dim``
    that is not a multiple of ``num_heads``."""
    return {m: int(m.num_heads) for m in mha_layers(model) if m.num_heads > 1}


# ------------------------------------------------------------------------- torchvision's Swin and MaxViT
def _class_path(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _whole_attention(m: nn.Module) -> tuple[str, str, str, str | None] | None:
    return WHOLE_ATTENTION.get(_class_path(m))


class WholeAttentionPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for an attention layer whose q/k/v width is its input width, as one layer:
    torchvision's Swin ``ShiftedWindowAttention`` (V1, V2; it splits q/k/v by ``C // num_heads`` of its
    input and calls ``F.linear`` on its weights) and MaxViT's ``RelativePositionalMultiHeadAttention``
    (it reshapes the heads' output back to its input width).

    Removing residual channel ``i`` removes rows ``i, C+i, 2C+i`` and column ``i`` of the q/k/v layer and
    row and column ``i`` of the output layer. The channels come in ``heads`` equal groups (torch-pruning
    removes the same head-size positions in every head), so the head count and everything per head (the
    relative position bias, Swin V2's ``logit_scale`` and ``cpb_mlp``) are unchanged; a stored head size
    (MaxViT's ``head_dim``) is updated."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        qkv_name, out_name, heads, head_dim = _whole_attention(layer)
        qkv, out = getattr(layer, qkv_name), getattr(layer, out_name)
        c = qkv.in_features
        keep = sorted(set(range(c)) - set(idxs))
        keep3 = [k + j * c for j in range(3) for k in keep]
        qkv.weight = self._prune_parameter_and_grad(qkv.weight, keep3, 0)
        qkv.weight = self._prune_parameter_and_grad(qkv.weight, keep, 1)
        if qkv.bias is not None:
            qkv.bias = self._prune_parameter_and_grad(qkv.bias, keep3, 0)
        qkv.in_features, qkv.out_features = len(keep), 3 * len(keep)
        out.weight = self._prune_parameter_and_grad(out.weight, keep, 0)
        out.weight = self._prune_parameter_and_grad(out.weight, keep, 1)
        if out.bias is not None:
            out.bias = self._prune_parameter_and_grad(out.bias, keep, 0)
        out.in_features = out.out_features = len(keep)
        if head_dim is not None:
            setattr(layer, head_dim, len(keep) // getattr(layer, heads))
        return layer

    prune_in_channels = prune_out_channels  # one set of channels: in and out are pruned together

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, _whole_attention(layer)[0]).in_features

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return int(getattr(layer, _whole_attention(layer)[2]))

    get_in_channel_groups = get_out_channel_groups


def _whole_attention_types(model: nn.Module) -> tuple[type, ...]:
    return tuple(dict.fromkeys(type(m) for m in model.modules() if _whole_attention(m) is not None))


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """torch-pruning ``customized_pruners`` for the attention layers metaprune prunes as one layer
    (torchvision's Swin and MaxViT); give them together with :func:`traceable` when building a
    dependency graph."""
    pruner = WholeAttentionPruner()
    return {t: pruner for t in _whole_attention_types(model)}


def _attention_stand_in(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0  # what the graph needs of the attention: C channels in, the same C out


def _merging_stand_in(m: nn.Module):
    """Swin's patch merging for tracing: the 2x2 neighbours are concatenated on the channels
    (``[x0, x1, x2, x3]``, ``4C``), here as a concatenation on dim 1 with the channels moved there, which
    torch-pruning's index mapping follows (it maps neither the strided spatial slices nor a last-dim
    concatenation). One row is taken (``select``) and no reshape is used: torch-pruning reads a reshape
    that feeds a wider layer as a flatten and would spread each channel over four. The stand-in's spatial
    size is of no concern (the attention stand-ins ignore it)."""
    v2 = type(m).__name__.endswith("V2")

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.select(1, 0).transpose(1, 2)  # (B, C, W)
        y = torch.cat([y, y, y, y], 1).transpose(1, 2)  # (B, W, 4C)
        y = m.norm(m.reduction(y)) if v2 else m.reduction(m.norm(y))
        return y.unsqueeze(1)  # (B, 1, W, 2C)

    return forward


def _partition_stand_in(m: nn.Module):
    """MaxViT's ``PartitionAttentionLayer`` for tracing: the window / grid partition (reshapes that fold
    the spatial size into the batch) becomes a permute to channels-last and back; attention and MLP with
    their residuals as in the real forward."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        y = y + m.attn_layer(y)
        y = y + m.mlp_layer(y)
        return y.permute(0, 3, 1, 2)

    return forward


_STAND_INS = {
    "torchvision.models.swin_transformer.PatchMerging": _merging_stand_in,
    "torchvision.models.swin_transformer.PatchMergingV2": _merging_stand_in,
    "torchvision.models.maxvit.PartitionAttentionLayer": _partition_stand_in,
}


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with stand-in forwards that torch-pruning's tracer can follow, while a dependency graph is
    built (nothing else may run the model in between: the stand-ins keep the channel structure only).

    torchvision's Swin window attention and MaxViT's partitioned attention fold channels and spatial
    dimensions together in reshapes (and Swin calls ``F.linear`` on its weights), which send
    torch-pruning's index mapping into ever longer index lists (MemoryError) or a TypeError. Their
    attention becomes one layer (:class:`WholeAttentionPruner`), Swin's patch merging a channel
    concatenation torch-pruning maps, MaxViT's partition a permute. Restores the real forwards on exit."""
    patched = []
    for m in model.modules():
        if _whole_attention(m) is not None:
            m.forward = _attention_stand_in
        elif _class_path(m) in _STAND_INS:
            m.forward = _STAND_INS[_class_path(m)](m)
        else:
            continue
        patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def graph_kwargs(model: nn.Module) -> dict[str, Any]:
    """What every torch-pruning dependency graph / pruner of ``model`` needs besides the model and input:
    ``unwrapped_parameters``, ``customized_pruners`` (Swin / MaxViT attention as one layer). Build it
    inside :func:`traceable`; a pruner also takes :func:`channel_groups` as ``out_channel_groups``."""
    return {"unwrapped_parameters": unwrapped_parameters(model), "customized_pruners": customized_pruners(model)}


def dependency_graph(model: nn.Module, example_input: Any) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced with the stand-ins of :func:`traceable` and the
    arguments of :func:`graph_kwargs` (what a graph of a torchvision Swin / MaxViT needs to be built at all)."""
    with traceable(model):
        return tp.DependencyGraph().build_dependency(model, example_input, **graph_kwargs(model))


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare parameters (class token, position embedding, ConvNeXt's ``layer_scale``...) as
    torch-pruning's ``(param, dim)`` list, by torch-pruning's own rule: every parameter not held by a
    layer type it prunes itself (conv of any kind incl. transposed, linear, norms, embedding, PReLU,
    multi-head attention, LSTM) follows the channels on its last dimension of size > 1 (a ``(C, 1, 1)``
    layer scale on dim 0, a ``(1, N, C)`` position embedding on dim 2); parameters with no such
    dimension are left alone."""
    box = tp.pruner.function.PrunerBox
    wrapped: set[int] = set()
    for m in model.modules():
        kind = tp.ops.module2type(m)
        # a whole-attention layer's own parameters are its pruner's (per-head tables stay as they are)
        if (kind in box and kind != tp.ops.OPTYPE.ELEMENTWISE) or _whole_attention(m) is not None:
            wrapped |= {id(p) for p in m.parameters()}
    out, seen = [], set()
    for p in model.parameters():
        if id(p) in wrapped or id(p) in seen:
            continue
        seen.add(id(p))
        dims = [i for i, n in enumerate(p.shape) if n > 1]
        if dims:
            out.append((p, dims[-1]))
    return out


# ------------------------------------------------------------------------- inputs and outputs of any model
def call(model: nn.Module, x: Any) -> Any:
    """``model`` on an example input as torch-pruning calls it: a dict as keyword arguments, a
    tuple / list as positional arguments, anything else as the one argument."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def first_sample(x: Any, device: torch.device) -> Any:
    """The first sample of every tensor in an example input (tensor, tuple / list or dict of them), on ``device``."""
    if isinstance(x, torch.Tensor):
        return x[:1].to(device) if x.dim() else x.to(device)
    if isinstance(x, dict):
        return {k: first_sample(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(first_sample(v, device) for v in x)
    return x


def flat_outputs(out: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a model output (tensor, tuple / list / dict / namedtuple of them) with its path."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, dict):
        return [t for k, v in out.items() for t in flat_outputs(v, f"{path}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in flat_outputs(v, f"{path}[{i}]")]
    return []


def output_signature(out: Any) -> dict[str, tuple[int, ...]]:
    """Path -> per-sample shape of every output tensor: what pruning must leave unchanged."""
    return {p: tuple(t.shape[1:]) for p, t in flat_outputs(out)}


def check_outputs(before: dict[str, tuple[int, ...]], out: Any, keep_output: bool) -> None:
    """Refuse a pruned model whose outputs differ in structure or shape from the original's, or are not finite."""
    after = output_signature(out)
    if set(after) != set(before):
        raise PruningError(f"the pruned model's outputs are {sorted(after)}, the original's {sorted(before)}; this "
                           "is a bug, please report it with the architecture")
    changed = [f"{p} {before[p]} -> {after[p]}" for p in before if after[p] != before[p]]
    if changed:
        hint = ("--ignore the layer(s) producing it" if keep_output else
                "this model's output is not the classifier's (a feature extractor / backbone?): pass "
                "keep_output=True (CLI --keep-output) to keep every layer that produces an output, or --ignore them")
        raise PruningError(f"pruning changed the model's output shape ({'; '.join(changed[:3])}, per sample); {hint}")
    bad = [p for p, t in flat_outputs(out) if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PruningError(f"the pruned model gives non-finite values in {', '.join(bad[:3])}; this is a bug, please "
                           "report it with the architecture")


def output_layers(model: nn.Module, x: Any) -> list[str]:
    """Names of the layers whose output channels reach a model output: from every output tensor back
    through channel-wise layers (norms, activations, pooling, additions, concatenation, reshapes) to
    the convs / linears that produce it. ``keep_output`` protects them (torch-pruning keeps the
    width of every group holding one), so every output keeps its shape."""
    names = {m: n for n, m in model.named_modules()}
    producer: dict[Any, nn.Module] = {}

    def hook(mod, _inp, out):
        for _, t in flat_outputs(out):
            if t.grad_fn is not None:
                producer[t.grad_fn] = mod

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PRODUCERS)]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = call(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    found: dict[nn.Module, None] = {}
    stack = [t.grad_fn for _, t in flat_outputs(out) if t.grad_fn is not None]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producer:
            found[producer[fn]] = None
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return [names[m] for m in found if names.get(m)]


def sync_attributes(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """Write the structure back after pruning: attention head counts, ``nn.MultiheadAttention``'s head size
    and the ViT residual width (torchvision's ``VisionTransformer`` reshapes by ``hidden_dim``)."""
    for attn in attention_layers(model):
        if attn.qkv in num_heads:
            attn.num_heads = int(num_heads[attn.qkv])
    for mha in mha_layers(model):
        if mha.embed_dim % mha.num_heads:  # channel_groups() keeps this from happening
            raise PruningError(f"nn.MultiheadAttention embed width pruned to {mha.embed_dim}, not a multiple of its "
                               f"{mha.num_heads} heads; this is a bug, please report it with the architecture")
        mha.head_dim = mha.embed_dim // mha.num_heads
    conv_proj = getattr(model, "conv_proj", None)
    if isinstance(getattr(model, "hidden_dim", None), int) and isinstance(conv_proj, nn.Conv2d):
        model.hidden_dim = conv_proj.out_channels
