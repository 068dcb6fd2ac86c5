"""Model, checkpoint and JSON files: safe loading (no pickle), atomic writes.

Model file format (``format_version`` 1): a ``.safetensors`` file whose metadata entry
``metaprune`` is a JSON object ``{"format_version", "arch", "arch_args", "widths",
"metaprune_version", "extra"}``. ``widths`` holds the structural attributes of every layer (see
:mod:`metaprune.models.widths`), so a pruned model reloads without pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from metaprune import __version__
from metaprune.errors import ModelFileError, OutputError
from metaprune.models import apply_widths, arch_spec, create_model, get_widths, list_models
from metaprune.models.registry import ARCH_ATTR, get_entry

FORMAT_VERSION = 1
META_KEY = "metaprune"
MODEL_FILENAME = "model.safetensors"


# ----------------------------------------------------------------------------- atomic writes
def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Validate an output path: its folder must be creatable and writable, and it must not be an input."""
    p = Path(path)
    for inp in inputs:
        if inp is not None and Path(inp).exists() and p.exists() and p.resolve() == Path(inp).resolve():
            raise OutputError(f"refusing to overwrite the input file {p}; choose another output path with -o")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {p.parent}: {e.strerror}; choose a writable path") from None
    if not os.access(p.parent, os.W_OK):
        raise OutputError(f"the output folder {p.parent} is not writable; choose a writable path with -o")
    if p.is_dir():
        raise OutputError(f"{p} is a folder; give a file name")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on error delete it."""
    p = check_output(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and writers may recreate the file)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`ModelFileError`."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes, dtypes and bytes), independent of the file format."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- model files
@dataclass
class ModelInfo:
    """Where a loaded model came from and how it is described."""

    path: str
    arch: str
    arch_args: dict
    extra: dict = field(default_factory=dict)
    source_format: str = "safetensors"


def model_spec(model: nn.Module, extra: dict | None = None) -> dict:
    """The JSON spec written next to a model's weights."""
    spec = arch_spec(model)
    return {
        "format_version": FORMAT_VERSION,
        "arch": spec["arch"],
        "arch_args": spec["args"],
        "widths": get_widths(model),
        "metaprune_version": __version__,
        "extra": extra or {},
    }


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None,
               inputs: tuple = ()) -> Path:
    """Write ``model`` as ``.safetensors`` with its architecture spec and widths in the metadata.

    ``path`` may be a folder (``model.safetensors`` is written inside). The write is atomic, and
    ``inputs`` lists files that must not be overwritten.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / MODEL_FILENAME
    check_output(p, inputs)
    spec = model_spec(model, extra)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(p) as tmp:
        save_file(sd, str(tmp), metadata={META_KEY: json.dumps(_jsonable(spec)), "format": "pt"})
    return p


def read_spec(path: str | os.PathLike) -> dict | None:
    """The metaprune spec stored in a ``.safetensors`` file, or ``None`` if it has none."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    if META_KEY not in meta:
        return None
    try:
        return json.loads(meta[META_KEY])
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the metaprune metadata is corrupt") from None


def build_from_spec(spec: dict, state_dict: dict[str, torch.Tensor], path: str = "<memory>") -> nn.Module:
    """Rebuild the module described by ``spec`` and load ``state_dict`` into it strictly."""
    if int(spec.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} has format_version {spec['format_version']}, newer than this metaprune "
                             f"({FORMAT_VERSION}); upgrade metaprune")
    model = create_model(spec["arch"], **spec["arch_args"])
    apply_widths(model, spec.get("widths", {}), state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ModelFileError(f"{path}: the weights do not fit architecture {spec['arch']!r} ({' '.join(first)})") from None
    return model


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILENAME).exists():
            return p / MODEL_FILENAME
        raise ModelFileError(f"{p} is a folder without {MODEL_FILENAME}; give the model file itself")
    if not p.exists():
        raise ModelFileError(f"model file {p} does not exist")
    return p


def load_state_dict_file(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[Any, str]:
    """Read a ``.safetensors`` or ``.pt`` file without unpickling (unless ``trust_pickle``).

    Returns ``(obj, format)``; ``obj`` is a state dict, a dict holding one, or (with
    ``trust_pickle``) a pickled ``nn.Module``.
    """
    p = _resolve(path)
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p)), "safetensors"
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{p} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True), "pt"
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ModelFileError(
                f"{p} holds pickled Python objects (e.g. a whole nn.Module), which can run arbitrary code when "
                "loaded; if you trust the file, pass --trust-pickle, or re-save it as a state dict"
            ) from None
        try:
            return torch.load(p, map_location="cpu", weights_only=False), "pickle"
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ModelFileError(f"{p} could not be unpickled: {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"{p} is not a readable PyTorch file ({str(e).splitlines()[0]}); "
                             "it may be truncated or corrupt") from None


_MHA_RENAMES = {"in_proj_weight": "qkv.weight", "in_proj_bias": "qkv.bias",
                "out_proj.weight": "proj.weight", "out_proj.bias": "proj.bias"}


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.").removeprefix("_orig_mod.")
        for old, new in _MHA_RENAMES.items():
            if k.endswith("self_attention." + old):
                k = k[: -len(old)] + new
        out[k] = v
    return out


def _unwrap_checkpoint(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ModelFileError("the file holds no state dict (expected tensors, or a dict with 'state_dict' or 'model')")


def _arch_args_from_shapes(name: str, sd: dict[str, torch.Tensor], base: nn.Module) -> dict:
    first_conv = next(m for m in base.modules() if isinstance(m, nn.Conv2d))
    first_key = next(k for k, m in base.named_modules() if m is first_conv) + ".weight"
    last_lin_name = [k for k, m in base.named_modules() if isinstance(m, nn.Linear)][-1]
    args = {"num_classes": int(sd[last_lin_name + ".weight"].shape[0]), "in_chans": int(sd[first_key].shape[1])}
    if "encoder.pos_embedding" in sd:  # ViT: image size from the number of patches
        patch = first_conv.kernel_size[0]
        args["image_size"] = int(round(math.sqrt(sd["encoder.pos_embedding"].shape[1] - 1))) * patch
    return args


def _widths_from_shapes(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Infer per-layer widths of a (possibly pruned) registered model from a state dict's shapes."""
    widths = get_widths(model)
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        w = sd.get(pre + "weight")
        if isinstance(m, nn.Conv2d) and w is not None:
            widths[name].update(out_channels=int(w.shape[0]), in_channels=int(w.shape[1]) * m.groups)
        elif isinstance(m, nn.Linear) and w is not None:
            widths[name].update(out_features=int(w.shape[0]), in_features=int(w.shape[1]))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and pre + "running_mean" in sd:
            widths[name].update(num_features=int(sd[pre + "running_mean"].shape[0]))
        elif isinstance(m, nn.LayerNorm) and w is not None:
            widths[name].update(normalized_shape=list(w.shape))
        elif hasattr(m, "num_heads") and pre + "qkv.weight" in sd:
            widths[name].update(num_heads=max(1, int(sd[pre + "qkv.weight"].shape[0]) // (3 * m.head_dim)))
        if "hidden_dim" in widths.get(name, {}) and "conv_proj.weight" in sd:
            widths[name]["hidden_dim"] = int(sd["conv_proj.weight"].shape[0])
    return widths


def match_architecture(state_dict: dict[str, torch.Tensor], path: str = "<state dict>") -> nn.Module:
    """Find the registered architecture whose keys match a bare state dict, infer its widths
    (pruned models included), and return it loaded. The error lists the closest candidates."""
    sd = _normalise_keys(state_dict)
    keys = {k for k in sd if not k.endswith("num_batches_tracked")}
    scores = []
    for name in list_models():
        with torch.device("meta"):
            base = create_model(name, **({"image_size": 224} if get_entry(name).family == "vit" else {}))
        base_keys = {k for k in base.state_dict() if not k.endswith("num_batches_tracked")}
        if base_keys == keys:
            args = _arch_args_from_shapes(name, sd, base)
            with torch.device("meta"):
                shaped = create_model(name, **args)
            spec = {"format_version": FORMAT_VERSION, "arch": name, "arch_args": args,
                    "widths": _widths_from_shapes(shaped, sd)}
            full = {**{k: v for k, v in shaped.state_dict().items() if k.endswith("num_batches_tracked")}, **sd}
            full = {k: (torch.zeros((), dtype=torch.long) if v.is_meta else v) for k, v in full.items()}
            return build_from_spec(spec, full, path)
        scores.append((len(base_keys & keys) / max(1, len(base_keys | keys)), name))
    best = ", ".join(f"{n} ({s:.0%} of keys shared)" for s, n in sorted(scores, reverse=True)[:3])
    raise ModelFileError(f"{path}: the state dict ({len(keys)} tensors) matches no registered architecture; "
                         f"closest: {best}. Check the file, or register the architecture with @register_model")


def load_model(path: str | os.PathLike, trust_pickle: bool = False,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Load a model file: metaprune ``.safetensors`` (spec + widths), a bare state dict in
    ``.safetensors``/``.pt`` (matched to a registered architecture by keys and shapes), or with
    ``trust_pickle`` a pickled module. Returns ``(model, info)``; the model is in eval mode."""
    p = _resolve(path)
    spec = read_spec(p) if p.suffix == ".safetensors" else None
    obj, fmt = load_state_dict_file(p, trust_pickle)
    if spec is not None:
        model = build_from_spec(spec, obj, str(p))
        extra = spec.get("extra", {})
    elif isinstance(obj, nn.Module):
        model = obj
        try:
            model = match_architecture(obj.state_dict(), str(p))
        except ModelFileError:
            setattr(model, ARCH_ATTR, {"arch": type(obj).__name__, "args": {}})
        extra = {}
    else:
        if isinstance(obj, dict) and isinstance(obj.get("metaprune"), dict) and "model" in obj:
            spec = obj["metaprune"]
            return build_from_spec(spec, obj["model"], str(p)).eval().to(map_location), ModelInfo(
                str(p), spec["arch"], spec["arch_args"], spec.get("extra", {}), fmt)
        model = match_architecture(_unwrap_checkpoint(obj), str(p))
        extra = {}
    spec_now = arch_spec(model)
    return model.eval().to(map_location), ModelInfo(str(p), spec_now["arch"], spec_now["args"], extra, fmt)
