"""Architecture registry (timm style): ``@register_model`` builders, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from metaprune.errors import ConfigError, MetapruneError, UnknownNameError

ARCH_ATTR = "metaprune_arch"


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder, family and default input size."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    default_image_size: int
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, family: str, image_size: int, description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder ``fn(num_classes=..., in_chans=..., **kw) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, family, image_size, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Names of registered architectures matching a glob ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise an error listing the valid ones.

    ``torchvision:NAME``, ``timm:NAME`` and (trusted) ``pkg.module:factory`` get an entry built on
    the fly (see :mod:`metaprune.models.ecosystem`); their builders take ``image_size`` too.
    """
    if isinstance(name, str) and ":" in name:
        from metaprune.models import ecosystem

        family, builder, size = ecosystem.resolve(name)
        return ModelEntry(name, builder, family, size, (builder.__doc__ or "").strip())
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list_models(), n=5)
        raise UnknownNameError(
            f"unknown model {name!r}; " + (f"close names: {', '.join(close)}; " if close else "")
            + f"valid names: {', '.join(list_models())} (see `metaprune list-models`; torchvision:NAME and "
            "timm:NAME name ecosystem models, `metaprune list-models --all`)"
        ) from None


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered architecture with fresh weights.

    Args:
        name: registry name, e.g. ``"cifar_resnet56"``, or ``"torchvision:NAME"``, ``"timm:NAME"``,
            ``"pkg.module:factory"`` (trusted code only; see :mod:`metaprune.models.ecosystem`).
        num_classes: size of the classifier output.
        in_chans: number of input image channels (1 for Fashion-MNIST).
        **kwargs: builder-specific arguments (e.g. ``image_size`` for ViTs).

    The returned module carries its spec in ``model.metaprune_arch`` (``{"arch", "args"}``),
    which :func:`metaprune.io.save_model` writes next to the weights.
    """
    entry = get_entry(name)
    if num_classes < 1 or in_chans < 1:
        raise ConfigError(f"num_classes and in_chans must be >= 1 (got {num_classes}, {in_chans})")
    params = inspect.signature(entry.builder).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        valid = [p for p in params if p not in ("num_classes", "in_chans")]
        raise ConfigError(f"model {name!r} does not take {unknown}; it takes {valid}")
    if ":" in name and kwargs.get("image_size") is None:  # ecosystem models always record their input size
        kwargs["image_size"] = entry.default_image_size
    model = entry.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    setattr(model, ARCH_ATTR, {"arch": name, "args": {"num_classes": num_classes, "in_chans": in_chans, **kwargs}})
    return model


def create_model_for_data(name: str, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """:func:`create_model` for a dataset's images: ``image_size`` is passed where the builder takes one (a ViT's
    position embeddings are sized by it; ecosystem models record it), so training and zoos build the same model."""
    params = inspect.signature(get_entry(name).builder).parameters
    takes = ":" in name or "image_size" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **({"image_size": image_size} if takes else {}))


#: the largest input height / width (pixels) a model file may record
MAX_INPUT_SIZE = 1 << 16


def recorded_input_size(model: nn.Module) -> int:
    """The input height = width (pixels) ``model`` is used at when no data says otherwise: the size it
    was trained / pruned at (``input_size``, recorded in model files), else its ``image_size``
    argument, else its architecture's default (32 for a module without a spec)."""
    spec = getattr(model, ARCH_ATTR, None)
    if not isinstance(spec, dict):
        return 32
    for size in (spec.get("input_size"), (spec.get("args") or {}).get("image_size")):
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            return size
    try:
        return get_entry(spec["arch"]).default_image_size
    except (MetapruneError, KeyError, TypeError):  # a module loaded from a pickle under its class name
        return 32


def set_input_size(model: nn.Module, size: int | None) -> nn.Module:
    """Record the input size ``model`` was trained / pruned at (written to its model file by
    :func:`metaprune.io.save_model`); ``None`` leaves it as it is. Returns ``model``."""
    spec = getattr(model, ARCH_ATTR, None)
    if size is not None and isinstance(spec, dict):
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_INPUT_SIZE:
            raise ConfigError(f"the input size must be an integer in 1..{MAX_INPUT_SIZE} pixels, not {size!r}")
        spec["input_size"] = size
    return model


def arch_spec(model: nn.Module) -> dict:
    """The ``{"arch", "args"}`` spec of a model built by :func:`create_model`."""
    spec = getattr(model, ARCH_ATTR, None)
    if spec is None:
        raise ConfigError(
            f"{type(model).__name__} was not built by metaprune.create_model, so it has no architecture spec; "
            "build it with create_model(name, ...) (torchvision:NAME / timm:NAME for ecosystem models), load it "
            "with metaprune.io.load_model, or name it: save_model(model, path, arch=..., arch_args={...})"
        )
    return spec
