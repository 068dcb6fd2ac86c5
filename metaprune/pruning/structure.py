"""What the pruning engine must know about a model: protected layers, attention heads,
bare parameters, and the attributes to write back after channels were removed."""

from __future__ import annotations

import difflib

from torch import nn

from metaprune.errors import ConfigError

_NORM_AND_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm,
                      nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU)


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


def resolve_ignored(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[nn.Module]:
    """Module instances for user-given layer names, plus the classifier. Unknown names raise an
    error with the closest valid names."""
    modules = dict(model.named_modules())
    out = [find_classifier(model)[1]]
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--ignore {name!r}: the model has no layer of that name{hint} "
                              "(names are module paths as in model.named_modules(), e.g. layer1.0.conv1)")
        out.append(modules[name])
    return out


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules whose heads can be removed whole: a fused ``qkv`` Linear plus an integer
    ``num_heads`` (``metaprune.models.SelfAttention`` and timm-style attention)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)]


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare parameters (class token, position embedding...) as torch-pruning's ``(param, dim)``
    list; they follow the residual width on their last dimension."""
    out = []
    for m in model.modules():
        if isinstance(m, _NORM_AND_PRUNABLE) or isinstance(m, nn.MultiheadAttention):
            continue
        for p in m.parameters(recurse=False):
            out.append((p, p.dim() - 1))
    return out


def sync_attributes(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """Write the structure back after pruning: attention head counts and the ViT residual width."""
    for attn in attention_layers(model):
        if attn.qkv in num_heads:
            attn.num_heads = int(num_heads[attn.qkv])
    conv_proj = getattr(model, "conv_proj", None)
    if isinstance(getattr(model, "hidden_dim", None), int) and isinstance(conv_proj, nn.Conv2d):
        model.hidden_dim = conv_proj.out_channels
