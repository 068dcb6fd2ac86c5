"""What the pruning engine must know about a model: protected layers, attention heads,
bare parameters, and the attributes to write back after channels were removed."""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from metaprune.errors import ConfigError, PruningError

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
    ``prune_heads=False``, the attention ``qkv`` layers."""
    ignored = resolve_ignored(model, config.ignore, classifier=not config.keep_output)
    if not config.prune_heads:  # attention keeps its heads and head size
        ignored += [a.qkv for a in attention_layers(model)]
    return ignored


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules whose heads can be removed whole: a fused ``qkv`` Linear plus an integer
    ``num_heads`` (``metaprune.models.SelfAttention`` and timm-style attention)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)]


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
        if kind in box and kind != tp.ops.OPTYPE.ELEMENTWISE:
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
    """Write the structure back after pruning: attention head counts and the ViT residual width."""
    for attn in attention_layers(model):
        if attn.qkv in num_heads:
            attn.num_heads = int(num_heads[attn.qkv])
    conv_proj = getattr(model, "conv_proj", None)
    if isinstance(getattr(model, "hidden_dim", None), int) and isinstance(conv_proj, nn.Conv2d):
        model.hidden_dim = conv_proj.out_channels
