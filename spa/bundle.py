"""Per-task bundles: save, load, and merge into a plain dense pruned model.

A bundle is a folder with

- ``adapter_config.json``: ``format_version``, ``metaprune_version``, ``method``, the method's
  config (``rank`` …), ``task``, ``classes``, ``num_classes``, ``input_shape``, ``head``,
  ``source_sha256`` (:func:`metaprune.io.state_dict_sha256` of the source) and
  ``source_arch``;
- ``adapter_model.safetensors``: ``masks`` (one bit per channel of every adapted layer's output and
  input and of every norm, bit-packed) and ``values`` (every learned tensor restricted to kept
  channels — adapter factors, biases, norm parameters, the task head — flattened in a fixed module
  order; see :func:`bundle_tensors`).

Format 2 (written now) stores ``values`` in float16 and no BatchNorm running statistics: at save
time each BatchNorm's eval-mode statistics are folded into its affine parameters
(``γ' = γ/√(var+ε)``, ``β' = β − γ'·mean``; the statistics become the canonical ``mean 0``,
``var 1−ε``) and every stored value is rounded to float16 — *in the saved model too*
(:func:`round_model_`). The task model is by definition what the bundle holds, so the model in
memory after :func:`save_bundle`, :func:`load_bundle` and :func:`merge` all compute the same
function (≤ 1e-5), and accuracy measured after saving is the accuracy the bundle reproduces.
When a value does not fit float16 the bundle falls back to float32 (``value_dtype`` in the
config). Format 1 bundles (float32, running statistics stored) still load.

:func:`merge` rebuilds the adapted model on the source, checks the hash, removes the masked
channels with torch-pruning (base and adapter together) and fuses every adapter away.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metaprune import __version__
from metaprune.errors import BundleError
from metaprune.io import atomic_path, state_dict_sha256
from spa.adapt import _NORMS, adapt_model, fuse_model
from spa.methods import MethodConfig, get_method
from spa.methods.base import AdaptedLayer

BUNDLE_FORMAT_VERSION = 2
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_STATS = ("running_mean", "running_var")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _mask_slots(model: nn.Module) -> list[tuple[str, str, int]]:
    """The deterministic order of mask slots: ``(layer, "out"|"in", size)`` for adapted layers, then norms."""
    slots = []
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            slots += [(name, "out", m.out_channels), (name, "in", m.in_channels)]
        elif isinstance(m, _NORMS):
            slots.append((name, "out", getattr(m, "num_features", None) or m.normalized_shape[0]))
    return slots


def _folds(m: nn.Module) -> bool:
    """Whether a norm's running statistics are folded into its affine parameters (format 2)."""
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats
            and m.running_mean is not None)


def _value_slots(model: nn.Module, fold_stats: bool = True) -> list[tuple[str, str, nn.Module, list[str | None]]]:
    """The deterministic order of learned tensors: ``(layer, tensor, module, channel space per axis)``.

    With ``fold_stats`` (format 2) folded BatchNorms contribute only their affine parameters.
    """
    slots = []
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            if m.weight.requires_grad:
                slots.append((name, "weight", m, ["out", "in"]))
            if m.bias is not None and m.bias.requires_grad:
                slots.append((name, "bias", m, ["out"]))
            for fname, fdims in m.factor_dims().items():
                slots.append((name, fname, m, list(fdims)))
        elif isinstance(m, _NORMS):
            for tname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t is not None and t.dim() > 0 and not (fold_stats and tname in _STATS and _folds(m)):
                    slots.append((name, tname, m, ["out"]))
    return slots


def _canonical_stats_(m: nn.Module) -> None:
    m.running_mean.zero_()
    m.running_var.fill_(1.0 - m.eps)


@torch.no_grad()
def round_model_(model: nn.Module, dtype: torch.dtype = torch.float16) -> torch.dtype:
    """Make ``model`` exactly what a bundle of it reproduces (in place); returns the value dtype used.

    Folds every BatchNorm's running statistics into its affine parameters (the statistics become
    ``mean 0, var 1−ε``, so eval mode computes the same function) and rounds every stored tensor to
    ``dtype``. When a value would overflow ``dtype`` nothing is rounded and float32 is returned.
    """
    for _, m in model.named_modules():
        if _folds(m) and not (m.running_mean.abs().max() == 0 and (m.running_var == 1.0 - m.eps).all()):
            scale = m.weight / torch.sqrt(m.running_var + m.eps)
            m.bias.copy_(m.bias - scale * m.running_mean)
            m.weight.copy_(scale)
            _canonical_stats_(m)
    tensors = [getattr(m, t) for _, t, m, _ in _value_slots(model)]
    if dtype != torch.float32 and any(float(t.detach().abs().max()) > torch.finfo(dtype).max for t in tensors):
        dtype = torch.float32
    for t in tensors:
        t.copy_(t.to(dtype).to(t.dtype))
    return dtype


def layer_masks_of(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Bool masks of every adapted layer and norm, read from the model (all-kept where none is set)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    norm_masks = getattr(model, "spa_norm_masks", None) or {}
    mods = dict(model.named_modules())
    for name, dim, size in _mask_slots(model):
        m = mods[name]
        if isinstance(m, AdaptedLayer):
            mask = getattr(m, f"{dim}_mask").detach().cpu() > 0
        else:
            mask = norm_masks.get(name, torch.ones(size, dtype=torch.bool)).detach().cpu().bool()
        out.setdefault(name, {})[dim] = mask
    return out


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    pad = (-len(bits)) % 8
    b = torch.cat([bits.to(torch.uint8), torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    return (b * (2 ** torch.arange(8, dtype=torch.uint8))).sum(1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:n].bool()


def bundle_tensors(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The bundle's two tensors: ``masks`` (bit-packed, every mask slot in order) and ``values``.

    ``values`` concatenates, in a fixed module order, every learned tensor restricted to kept
    channels: adapter factors, trainable weights and biases, norm parameters and running
    statistics (unless folded, format 2), the head. The order and shapes follow from the source
    architecture, the method and the masks, so no per-tensor names need storing (the file stays
    small). ``values`` has ``dtype``; call :func:`round_model_` first so that nothing is lost.
    """
    masks = layer_masks_of(model)
    bits = torch.cat([masks[n][d] for n, d, _ in _mask_slots(model)])
    parts = []
    for name, tname, m, dims in _value_slots(model):
        t = getattr(m, tname).detach().cpu().float()
        for ax, d in enumerate(dims):
            if d is not None:
                t = t.index_select(ax, masks[name][d].nonzero().flatten())
        parts.append(t.reshape(-1))
    return {"masks": _pack_bits(bits), "values": torch.cat(parts).to(dtype).contiguous()}


def save_bundle(model: nn.Module, out_dir: str | os.PathLike, *, method: str, method_config: MethodConfig,
                task: str, classes: list[str], source_sha256: str, input_shape: tuple[int, ...],
                extra: dict | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (atomically).

    ``model`` is first made what the bundle reproduces (:func:`round_model_`: BatchNorm statistics
    folded, values rounded to float16), in place, so evaluating it afterwards measures the bundle.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = getattr(model, "metaprune_arch", {})
    cfg = {"format_version": BUNDLE_FORMAT_VERSION, "metaprune_version": __version__, "method": method,
           "method_config": asdict(method_config), "rank": getattr(method_config, "rank", None),
           "task": task, "classes": list(classes), "num_classes": len(classes),
           "input_shape": list(input_shape), "head": model.spa_head, "source_sha256": source_sha256,
           "source_arch": arch.get("arch"), "extra": extra or {}}
    dtype = round_model_(model)
    tensors = bundle_tensors(model, dtype)
    cfg["n_values"] = int(tensors["values"].numel())
    cfg["layout"] = "packed-v2"
    cfg["value_dtype"] = "float16" if dtype == torch.float16 else "float32"
    cfg["norm_stats"] = "folded"
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "spa_format_version": str(BUNDLE_FORMAT_VERSION)})
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfg, separators=(",", ":")) + "\n")
    return out


def read_bundle(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a bundle folder; a missing, corrupt or truncated file raises :class:`BundleError`."""
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    cfg_path, w_path = p / CONFIG_NAME, p / WEIGHTS_NAME
    for f in (cfg_path, w_path):
        if not f.exists():
            raise BundleError(f"{p} is not a bundle: {f.name} is missing (a bundle folder holds {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME}, as written by `metaprune adapt`)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{cfg_path} is not valid JSON ({e}); the bundle is corrupt or truncated — re-create it "
                          "with `metaprune adapt`") from None
    for key in ("format_version", "method", "source_sha256", "num_classes", "head"):
        if key not in cfg:
            raise BundleError(f"{cfg_path} has no {key!r}; it was not written by `metaprune adapt` or is damaged")
    if int(cfg["format_version"]) > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{p} has bundle format {cfg['format_version']}, newer than this metaprune "
                          f"({BUNDLE_FORMAT_VERSION}); upgrade metaprune")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{w_path} cannot be read ({e}); the file is truncated or corrupt — re-create the bundle "
                          "with `metaprune adapt`") from None
    return cfg, tensors


def load_bundle(path: str | os.PathLike, source: nn.Module) -> nn.Module:
    """The masked adapted model of a bundle, rebuilt on ``source`` (which must be the bundle's source).

    Raises :class:`BundleError` naming both hashes when ``source`` is not the model the bundle was
    trained on, and when tensors are missing or have the wrong shape.
    """
    cfg, tensors = read_bundle(path)
    have = state_dict_sha256(source)
    if have != cfg["source_sha256"]:
        raise BundleError(f"bundle {path} was trained on the source model with sha256 {cfg['source_sha256']}, "
                          f"but the given source has sha256 {have}; pass the bundle's own source model")
    cfg_cls, _ = get_method(cfg["method"])
    mcfg = cfg_cls(**cfg.get("method_config", {}))
    model = adapt_model(source, cfg["method"], mcfg, num_classes=int(cfg["num_classes"]))
    if model.spa_head != cfg["head"]:
        raise BundleError(f"bundle {path} has head {cfg['head']!r} but the source's head is {model.spa_head!r}")
    _scatter(model, tensors, str(path), int(cfg["format_version"]))
    model.eval()
    model.spa_config = cfg
    return model


@torch.no_grad()
def _scatter(model: nn.Module, tensors: dict[str, torch.Tensor], path: str, version: int) -> None:
    if set(tensors) != {"masks", "values"}:
        raise BundleError(f"bundle {path} holds tensors {sorted(tensors)}, expected 'masks' and 'values'; "
                          "it was not written by this metaprune")
    slots = _mask_slots(model)
    n_bits = sum(s for _, _, s in slots)
    packed = tensors["masks"].to(torch.uint8).flatten()
    if packed.numel() != (n_bits + 7) // 8:
        raise BundleError(f"bundle {path} has {packed.numel() * 8} mask bits but this source architecture needs "
                          f"{n_bits}; the bundle belongs to another architecture")
    bits = _unpack_bits(packed, n_bits)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    pos = 0
    for name, dim, size in slots:
        masks.setdefault(name, {})[dim] = bits[pos:pos + size]
        pos += size
    mods = dict(model.named_modules())
    for name, mm in masks.items():
        if not all(bool(v.any()) for v in mm.values()):
            raise BundleError(f"bundle {path} prunes every channel of {name}; the file is corrupt")
        m = mods[name]
        if isinstance(m, AdaptedLayer):
            m.out_mask.copy_(mm["out"].to(m.out_mask.dtype))
            m.in_mask.copy_(mm["in"].to(m.in_mask.dtype))
    model.spa_norm_masks = {n: masks[n]["out"] for n, m in mods.items() if isinstance(m, _NORMS) and n in masks}
    values = tensors["values"].flatten()
    fold = version >= 2
    if fold:
        for m in mods.values():
            if _folds(m):
                _canonical_stats_(m)
    pos = 0
    for name, tname, m, dims in _value_slots(model, fold_stats=fold):
        target = getattr(m, tname)
        index = [None if d is None else masks[name][d].nonzero().flatten() for d in dims]
        shape = [len(i) if i is not None else target.shape[a] for a, i in enumerate(index)]
        shape += list(target.shape[len(index):])
        n = int(torch.tensor(shape).prod()) if shape else 1
        if pos + n > values.numel():
            raise BundleError(f"bundle {path} ends before {name}.{tname} ({values.numel()} values); it is "
                              "truncated or belongs to another architecture or method")
        src = values[pos:pos + n].view(shape).to(target.dtype)  # float16 -> float32 is exact
        pos += n
        full = torch.full_like(target, 1.0 if tname == "running_var" else 0.0)
        axes = [i if i is not None else torch.arange(target.shape[a]) for a, i in enumerate(index)]
        full[torch.meshgrid(*axes, indexing="ij")] = src
        target.copy_(full)
    if pos != values.numel():
        raise BundleError(f"bundle {path} has {values.numel() - pos} values more than this source and method use; "
                          "it belongs to another architecture or method")


def merge(bundle: str | os.PathLike, source: nn.Module) -> nn.Module:
    """A plain dense pruned model (registered architecture at pruned widths, no adapter modules left)."""
    from spa.adapt import find_head
    from spa.prune import build_graph, channel_groups, physically_prune

    model = load_bundle(bundle, source)
    cfg = model.spa_config
    example = torch.zeros(1, *cfg["input_shape"], device=next(model.parameters()).device)
    dg = build_graph(model, example)
    groups = channel_groups(model, dg, model.get_submodule(model.spa_head))
    physically_prune(model, dg, groups)
    for attr in ("spa_config", "spa_norm_masks"):
        if hasattr(model, attr):
            delattr(model, attr)
    plain = fuse_model(model)
    assert find_head(plain)
    return plain.eval()
