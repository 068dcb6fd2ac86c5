"""Architectures from the ecosystem: ``torchvision:NAME``, ``timm:NAME`` and (trusted) ``pkg.module:factory``.

An ``arch`` string with a colon names a model metaprune did not register:

* ``torchvision:NAME`` - any ``torchvision.models`` classification builder (``weights=None``);
* ``timm:NAME`` - any timm model (``pretrained=False``; needs ``pip install metaprune[timm]``);
* ``pkg.module:factory`` - a user's function ``factory(num_classes=..., in_chans=..., image_size=...)``
  (only the arguments it takes are passed). Importing it runs the user's code, so it is refused
  unless code is trusted (``--trust-code`` on the command line, :func:`trusted_code` in Python).

Every one of them takes ``num_classes``, ``in_chans`` and ``image_size`` (the input size, recorded in
model files and used for example inputs; passed to the builders that need it: torchvision ViT and
MaxViT, timm models with a fixed input size). torchvision builders have no ``in_chans``: when it is
not 3 the first convolution is replaced by one with ``in_chans`` inputs and otherwise the same
settings (freshly initialised). Per-model facts (first convolution, classifier, default input size)
come from one place, :func:`model_facts` (timm's pretrained config for timm models).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.errors import ConfigError, UnknownNameError

TIMM_EXTRA = "pip install 'metaprune[timm]'"
_TRUST = contextvars.ContextVar("metaprune_trust_code", default=False)
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
# default input sizes that differ from 224 (torchvision), and the smallest input each family runs at
_TV_INPUT = {"inception_v3": 299}
_TV_MIN_INPUT = {"inception_v3": 75, "googlenet": 32, "alexnet": 63, "maxvit_t": 224}


class UntrustedCodeError(ConfigError):
    """A ``pkg.module:factory`` architecture was named without trusting code."""


@contextlib.contextmanager
def trusted_code(trust: bool = True) -> Iterator[None]:
    """Allow (or, with ``False``, forbid) importing ``pkg.module:factory`` architectures in this block."""
    tok = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(tok)


def is_external(name: str) -> bool:
    """Whether ``name`` is an ecosystem / user architecture string (it has a colon)."""
    return isinstance(name, str) and ":" in name


def _close(name: str, names: list[str], prefix: str) -> str:
    hits = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not hits:
        hits = [n for n in names if name.split("_")[0] and n.startswith(name.split("_")[0][:4])][:5]
    return ", ".join(f"{prefix}{h}" for h in hits) or "none"


# ----------------------------------------------------------------------------- torchvision
@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's classification builders."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_chans:
        return
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups if conv.groups == 1 else in_chans, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@contextlib.contextmanager
def _regnet_on_cpu() -> Iterator[None]:
    """torchvision's RegNet computes its block widths with tensors (``.tolist()``), which fails on the
    meta device; compute them on the CPU while the modules themselves are built where asked."""
    from torchvision.models import regnet

    orig = regnet.BlockParams.__dict__["from_init_params"]

    def from_init_params(cls, *a, **k):
        with torch.device("cpu"):
            return orig.__func__(cls, *a, **k)

    regnet.BlockParams.from_init_params = classmethod(from_init_params)
    try:
        yield
    finally:
        regnet.BlockParams.from_init_params = orig


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    fn = tvm.get_model_builder(name)

    def build(num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None) -> nn.Module:
        kw: dict = {"weights": None, "num_classes": num_classes}
        size = image_size or _TV_INPUT.get(name, 224)
        if name.startswith("vit_"):
            kw["image_size"] = size
        elif name.startswith("maxvit"):
            kw["input_size"] = (size, size)
        elif name in ("googlenet", "inception_v3"):
            kw["init_weights"] = True  # torchvision's own default, without its FutureWarning
        ctx = _regnet_on_cpu() if name.startswith("regnet") else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = fn(**kw)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
        return model

    build.__doc__ = f"torchvision.models.{name} (weights=None)"
    return build


# ----------------------------------------------------------------------------- timm
def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm architectures need the timm package, which is not installed; install the extra: "
                          f"{TIMM_EXTRA}") from None
    return timm


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    timm = _timm()

    def build(num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None) -> nn.Module:
        kw = {}
        cfg = timm.models.get_pretrained_cfg(name)
        if image_size and cfg is not None and getattr(cfg, "fixed_input_size", False):
            kw["img_size"] = image_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)

    build.__doc__ = f"timm.create_model({name!r}, pretrained=False)"
    return build


# ----------------------------------------------------------------------------- user factories
def _user_builder(spec: str) -> Callable[..., nn.Module]:
    if not _FACTORY.match(spec):
        raise UnknownNameError(f"{spec!r} is not an architecture: use a registered name, torchvision:NAME, timm:NAME "
                               "or pkg.module:factory (see `metaprune list-models --all`)")
    if not _TRUST.get():
        raise UntrustedCodeError(f"architecture {spec!r} is user code (module {spec.split(':')[0]!r}); importing it "
                                 "runs that code, so it needs --trust-code (Python: metaprune.models.trusted_code())")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {mod_name!r} for architecture {spec!r} ({e}); check the name and that "
                          "the module is on PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UnknownNameError(f"module {mod_name!r} has no function {fn_name!r} (architecture {spec!r})")
    params = inspect.signature(fn).parameters
    takes_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def build(num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None) -> nn.Module:
        given = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
        kw = {k: v for k, v in given.items() if v is not None and (takes_kw or k in params)}
        model = fn(**kw)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    build.__doc__ = f"user factory {spec}"
    return build


# ----------------------------------------------------------------------------- entries and facts
def resolve(name: str) -> tuple[str, Callable[..., nn.Module], int]:
    """``(family, builder, default input size)`` for an ecosystem / user architecture string."""
    src, _, model = name.partition(":")
    if src == "torchvision":
        names = torchvision_names()
        if model not in names:
            raise UnknownNameError(f"unknown torchvision model {model!r}; close names: "
                                   f"{_close(model, list(names), 'torchvision:')} (all: `metaprune list-models --all`)")
        return "torchvision", _torchvision_builder(model), _TV_INPUT.get(model, 224)
    if src == "timm":
        timm = _timm()
        if not timm.is_model(model):
            raise UnknownNameError(f"unknown timm model {model!r}; close names: "
                                   f"{_close(model, timm.list_models(), 'timm:')} "
                                   "(all: `metaprune list-models --all`)")
        cfg = timm.models.get_pretrained_cfg(model)
        size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        return "timm", _timm_builder(model), size
    return "user", _user_builder(name), 224


@dataclass(frozen=True)
class ModelFacts:
    """What metaprune needs to know about an architecture: module names of the first convolution and
    of the classifier, and its default and smallest input size (pixels)."""

    first_conv: str | None
    classifier: str | None
    input_size: int
    min_input_size: int = 32


@functools.lru_cache(maxsize=256)
def model_facts(arch: str) -> ModelFacts:
    """The facts of ``arch`` (registry name or ecosystem string): timm's pretrained config for timm
    models; for the others, found once on the meta device (first ``Conv2d``; last layer whose output
    size is ``num_classes``)."""
    from metaprune.models.registry import get_entry

    entry = get_entry(arch)
    if arch.startswith("timm:"):
        cfg = _timm().models.get_pretrained_cfg(arch.partition(":")[2])
        if cfg is not None and cfg.first_conv and cfg.classifier:
            first = cfg.first_conv[0] if isinstance(cfg.first_conv, (list, tuple)) else cfg.first_conv
            head = cfg.classifier[0] if isinstance(cfg.classifier, (list, tuple)) else cfg.classifier
            return ModelFacts(first, head, entry.default_image_size)
    probe_classes = 977
    with torch.device("meta"):
        model = entry.builder(num_classes=probe_classes)
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    heads = [n for n, m in model.named_modules()
             if getattr(m, "out_features", None) == probe_classes or getattr(m, "out_channels", None) == probe_classes]
    name = arch.partition(":")[2]
    return ModelFacts(first, heads[-1] if heads else None, entry.default_image_size,
                      _TV_MIN_INPUT.get(name, 32) if arch.startswith("torchvision:") else 32)


def list_external(source: str = "all") -> list[str]:
    """``torchvision:NAME`` (and, when timm is installed, ``timm:NAME``) strings, sorted."""
    out = [f"torchvision:{n}" for n in torchvision_names()] if source in ("all", "torchvision") else []
    if source in ("all", "timm"):
        try:
            import timm
        except ImportError:
            if source == "timm":
                _timm()
        else:
            out += [f"timm:{n}" for n in timm.list_models()]
    return out
