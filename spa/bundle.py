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
time a *copy* of the model has each BatchNorm's eval-mode statistics folded into its affine
parameters (``γ' = γ/√(var+ε)``, ``β' = β − γ'·mean``; the statistics become the canonical
``mean 0``, ``var 1−ε``) and every stored value rounded to float16 (:func:`round_model_`).
Saving never changes the caller's model (its parameters, statistics and train-mode function stay
as they were); :func:`load_bundle` and :func:`merge` give back the rounded model, which computes
the saved model's eval function up to float16 rounding, and merged == loaded (≤ 1e-5). When a
value does not fit float16 the bundle falls back to float32 (``value_dtype`` in the config).
Format 1 bundles (float32, running statistics stored) still load.

Reading validates everything before anything is built (:func:`validate_config`,
:func:`validate_tensors`): unknown or wrongly typed config keys, unknown methods or method
options, out-of-range numbers, tensors of the wrong name, dtype (float masks) or size, and
NaN/Inf values all raise :class:`~metaprune.errors.BundleError`.

:func:`merge` rebuilds the adapted model on the source, checks the hash, removes the masked
channels with torch-pruning (base and adapter together) and fuses every adapter away.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metaprune import __version__
from metaprune.errors import BundleError, MetapruneError
from metaprune.io import atomic_path, runs_at, state_dict_sha256
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

    ``model`` is left exactly as it was: a copy is made what the bundle reproduces
    (:func:`round_model_`: BatchNorm statistics folded, values rounded to float16) and written.
    :func:`load_bundle` gives that model back; it computes the same eval function as ``model`` up
    to the float16 rounding. Non-finite values are refused (:class:`BundleError`), nothing is written.
    """
    out = Path(out_dir)
    arch = getattr(model, "metaprune_arch", {})
    cfg = {"format_version": BUNDLE_FORMAT_VERSION, "metaprune_version": __version__, "method": method,
           "method_config": asdict(method_config), "rank": getattr(method_config, "rank", None),
           "task": task, "classes": list(classes), "num_classes": len(classes),
           "input_shape": list(input_shape), "head": model.spa_head, "source_sha256": source_sha256,
           "source_arch": arch.get("arch"), "extra": extra or {}}
    snapshot = copy.deepcopy(model)  # saving has no side effects on the caller's model
    dtype = round_model_(snapshot)
    tensors = bundle_tensors(snapshot, dtype)
    del snapshot
    if not bool(torch.isfinite(tensors["values"]).all()):
        n = int((~torch.isfinite(tensors["values"])).sum())
        raise BundleError(f"the adapted model holds {n} NaN/Inf value(s) in its learned tensors; nothing was "
                          f"written to {out} — the training diverged (lower the learning rate)")
    cfg["n_values"] = int(tensors["values"].numel())
    cfg["layout"] = "packed-v2"
    cfg["value_dtype"] = "float16" if dtype == torch.float16 else "float32"
    cfg["norm_stats"] = "folded"
    validate_config(cfg, str(out / CONFIG_NAME))  # what we write is what we accept
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "spa_format_version": str(BUNDLE_FORMAT_VERSION)})
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfg, separators=(",", ":")) + "\n")
    return out


# ----------------------------------------------------------------------------- validation
_HEX = set("0123456789abcdef")
_CONFIG_REQUIRED = {"format_version": int, "method": str, "method_config": dict, "task": str, "classes": list,
                    "num_classes": int, "input_shape": list, "head": str, "source_sha256": str, "n_values": int,
                    "layout": str}
_CONFIG_OPTIONAL = {"metaprune_version": str, "rank": (int, type(None)), "source_arch": (str, type(None)),
                    "extra": dict, "value_dtype": str, "norm_stats": str}
_LAYOUTS = {1: "packed-v1", 2: "packed-v2"}
_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
MAX_IMAGE_SIZE = 1024


def _field_types(annotation) -> tuple[type, ...]:
    if isinstance(annotation, type):
        return (annotation,)
    return tuple(_FIELD_TYPES[t.strip()] for t in str(annotation).split("|"))


def validate_config(cfg, where: str) -> dict:
    """Check every key, type and range of a bundle's ``adapter_config.json``; raise :class:`BundleError`.

    Nothing is built before this passes: unknown or missing keys, wrongly typed values, unknown
    method names or method options, out-of-range numbers and inconsistent counts are all refused.
    """
    import dataclasses

    from metaprune.io import check_json_object

    fv = cfg.get("format_version") if isinstance(cfg, dict) else None
    if isinstance(fv, int) and not isinstance(fv, bool) and fv > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{where} has bundle format {fv}, newer than this metaprune ({BUNDLE_FORMAT_VERSION}); "
                          "upgrade metaprune")
    check_json_object(cfg, where, _CONFIG_REQUIRED, _CONFIG_OPTIONAL, error=BundleError)

    def bad(msg: str):
        raise BundleError(f"{where}: {msg}; the bundle is corrupt or was edited — re-create it with `metaprune adapt`")

    if fv not in _LAYOUTS:
        bad(f"format_version {fv} is not a bundle format (1..{BUNDLE_FORMAT_VERSION})")
    if cfg["layout"] != _LAYOUTS[fv]:
        bad(f"layout {cfg['layout']!r} does not belong to format {fv} (expected {_LAYOUTS[fv]!r})")
    if fv >= 2:
        for k in ("value_dtype", "norm_stats"):
            if k not in cfg:
                bad(f"{k!r} is missing (format {fv} stores it)")
        if cfg["norm_stats"] != "folded":
            bad(f"norm_stats {cfg['norm_stats']!r} is unknown (format 2 folds them: 'folded')")
    if cfg.get("value_dtype", "float32") not in VALUE_DTYPES:
        bad(f"value_dtype {cfg.get('value_dtype')!r} is not one of {', '.join(VALUE_DTYPES)}")
    if fv < 2 and cfg.get("value_dtype", "float32") != "float32":
        bad("format 1 bundles hold float32 values")
    from spa.methods import METHODS

    if cfg["method"] not in METHODS:
        bad(f"method {cfg['method']!r} is unknown (known: {', '.join(METHODS)})")
    cfg_cls, _ = METHODS[cfg["method"]]
    flds = {f.name: _field_types(f.type) for f in dataclasses.fields(cfg_cls)}
    check_json_object(cfg["method_config"], f"{where}: method_config of {cfg['method']}", {},
                      flds, error=BundleError)
    mc = cfg["method_config"]
    n_values = cfg["n_values"]
    if n_values < 0:
        bad(f"n_values {n_values} is negative")
    for k, v in mc.items():
        if isinstance(v, float) and not math.isfinite(v):
            bad(f"method_config {k} is {v}")
        if k in ("rank", "seq_rank") and v is not None and not 1 <= v <= max(1, n_values):
            bad(f"method_config {k} {v} is out of range (1..{max(1, n_values)}, the stored values)")
    if cfg.get("rank") is not None and cfg["rank"] != mc.get("rank", cfg["rank"]):
        bad(f"rank {cfg['rank']} disagrees with method_config rank {mc.get('rank')}")
    nc = cfg["num_classes"]
    if nc < 1 or len(cfg["classes"]) != nc:
        bad(f"num_classes {nc} must be >= 1 and equal the number of classes listed ({len(cfg['classes'])})")
    if not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in cfg["classes"]):
        bad("classes must be names (strings) or integers")
    shp = cfg["input_shape"]
    if len(shp) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_IMAGE_SIZE
                                for d in shp):
        bad(f"input_shape {shp!r:.60} must be three integers (C, H, W) in 1..{MAX_IMAGE_SIZE}")
    sha = cfg["source_sha256"]
    if len(sha) != 64 or not set(sha) <= _HEX:
        bad(f"source_sha256 {sha!r:.80} is not a SHA-256 hex digest")
    if not cfg["head"] or len(cfg["head"]) > 1000:
        bad("head must name the classifier module")
    return cfg


def validate_tensors(tensors: dict[str, torch.Tensor], cfg: dict, where: str) -> None:
    """Check the bundle's tensors against its config: names, dtypes, shapes, finite values."""
    if set(tensors) != {"masks", "values"}:
        raise BundleError(f"{where} holds tensors {sorted(tensors)[:6]}, expected 'masks' and 'values'; it was not "
                          "written by this metaprune")
    masks, values = tensors["masks"], tensors["values"]
    if masks.dtype != torch.uint8 or masks.dim() != 1:
        raise BundleError(f"{where}: 'masks' must be bit-packed uint8 (1-D), not {masks.dtype} of shape "
                          f"{tuple(masks.shape)}; the bundle is corrupt or was edited")
    want = VALUE_DTYPES[cfg.get("value_dtype", "float32")]
    if values.dtype != want or values.dim() != 1:
        raise BundleError(f"{where}: 'values' must be 1-D {want} (value_dtype), not {values.dtype} of shape "
                          f"{tuple(values.shape)}; the bundle is corrupt or was edited")
    if values.numel() != cfg["n_values"]:
        raise BundleError(f"{where}: 'values' holds {values.numel()} numbers but the config says n_values "
                          f"{cfg['n_values']}; the bundle is truncated or its files do not belong together")
    if not bool(torch.isfinite(values).all()):
        n = int((~torch.isfinite(values)).sum())
        raise BundleError(f"{where}: 'values' holds {n} NaN/Inf number(s); the bundle is corrupt or the run that "
                          "wrote it diverged — re-create it with `metaprune adapt`")


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
    if cfg_path.is_dir() or w_path.is_dir():
        raise BundleError(f"{p} is not a bundle: {CONFIG_NAME} and {WEIGHTS_NAME} must be files")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise BundleError(f"{cfg_path} is not valid JSON ({str(e)[:120]}); the bundle is corrupt or truncated — "
                          "re-create it with `metaprune adapt`") from None
    validate_config(cfg, str(cfg_path))
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise BundleError(f"{w_path} cannot be read ({str(e)[:200]}); the file is truncated or corrupt — re-create "
                          "the bundle with `metaprune adapt`") from None
    validate_tensors(tensors, cfg, str(w_path))
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
    from spa.adapt import find_head

    head = find_head(source)
    if head != cfg["head"]:
        raise BundleError(f"bundle {path} has head {cfg['head']!r} but the source's head is {head!r}")
    args = getattr(source, "metaprune_arch", {}).get("args", {})
    in_chans, size = args.get("in_chans"), args.get("image_size")
    if in_chans is not None and cfg["input_shape"][0] != in_chans:
        raise BundleError(f"bundle {path} takes {cfg['input_shape'][0]}-channel inputs but the source takes {in_chans}")
    if size is not None and list(cfg["input_shape"][1:]) != [size, size]:
        why = runs_at(source, tuple(cfg["input_shape"]))  # a convolutional source runs at any size; a ViT does not
        if why is not None:
            raise BundleError(f"bundle {path} takes {cfg['input_shape'][1]}x{cfg['input_shape'][2]} images but the "
                              f"source takes {size}x{size} and does not run at the bundle's size ({why})")
    cfg_cls, _ = get_method(cfg["method"])
    try:
        mcfg = cfg_cls(**cfg["method_config"])
    except MetapruneError as e:
        raise BundleError(f"bundle {path}: method_config is invalid ({e})") from None
    model = adapt_model(source, cfg["method"], mcfg, num_classes=cfg["num_classes"])
    _scatter(model, tensors, str(path), cfg["format_version"])
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
    if bool(_unpack_bits(packed, packed.numel() * 8)[n_bits:].any()):
        raise BundleError(f"bundle {path} sets mask bits past the {n_bits} this architecture uses; the file is corrupt")
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


def _check_masks_coupled(model: nn.Module, groups, where: str) -> None:
    """Every mask must be the one its dependency group's root implies (what :func:`merge` removes).

    A bundle whose masks disagree inside a group (edited or damaged) would merge into a model
    that is not the masked model; it is refused.
    """
    from spa.prune import layer_masks

    mods = dict(model.named_modules())
    keep = {g.root: mods[g.root].out_mask.detach().cpu() > 0 for g in groups}
    expect = layer_masks(model, groups, keep)
    for name, dims in layer_masks_of(model).items():
        for dim, mask in dims.items():
            want = expect.get(name, {}).get(dim)
            want = torch.ones_like(mask) if want is None else want.cpu().bool()
            if not torch.equal(mask, want):
                raise BundleError(f"bundle {where}: the {dim} mask of {name} disagrees with its dependency group "
                                  f"({int(mask.sum())} vs {int(want.sum())} channels kept); the bundle is corrupt "
                                  "or was edited")


def merge(bundle: str | os.PathLike, source: nn.Module) -> nn.Module:
    """A plain dense pruned model (registered architecture at pruned widths, no adapter modules left)."""
    from spa.adapt import find_head
    from spa.prune import build_graph, channel_groups, physically_prune

    model = load_bundle(bundle, source)
    cfg = model.spa_config
    example = torch.zeros(1, *cfg["input_shape"], device=next(model.parameters()).device)
    dg = build_graph(model, example)
    groups = channel_groups(model, dg, model.get_submodule(model.spa_head))
    _check_masks_coupled(model, groups, str(bundle))
    physically_prune(model, dg, groups)
    for attr in ("spa_config", "spa_norm_masks"):
        if hasattr(model, attr):
            delattr(model, attr)
    plain = fuse_model(model)
    assert find_head(plain)
    from metaprune.models.registry import set_input_size

    return set_input_size(plain, int(cfg["input_shape"][-1])).eval()  # the size the bundle was trained at
