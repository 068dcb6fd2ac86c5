"""Model, checkpoint and JSON files: safe loading (no pickle), atomic writes.

Model file format (``format_version`` 1): a ``.safetensors`` file whose metadata entry
``metaprune`` is a JSON object ``{"format_version", "arch", "arch_args", "widths", "input_size",
"metaprune_version", "extra"}``. ``widths`` holds the structural attributes of every layer (see
:mod:`metaprune.models.widths`), so a pruned model reloads without pickle. ``input_size`` (optional;
files written before it existed load without it) is the input height = width in pixels the model
was trained / pruned at: the default size for MACs, latency, export and the graph converter.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from metaprune import __version__
from metaprune.errors import ConfigError, MetapruneError, ModelFileError, OutputError
from metaprune.models import apply_widths, arch_spec, create_model, get_widths, list_models
from metaprune.models.registry import (
    ARCH_ATTR,
    MAX_INPUT_SIZE,
    get_entry,
    recorded_input_size,
    set_input_size,
)

FORMAT_VERSION = 1
META_KEY = "metaprune"
MODEL_FILENAME = "model.safetensors"


# ----------------------------------------------------------------------------- outputs never replace inputs
def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(p))


def input_files(inputs) -> set[str]:
    """Real paths (symlinks resolved) of every input: files, and folders with every file inside them."""
    out: set[str] = set()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        r = _real(inp)
        if os.path.isdir(r):
            out.add(r)
            for dirpath, _dirs, files in os.walk(r):
                out.update(_real(os.path.join(dirpath, f)) for f in files)
        elif os.path.lexists(r):
            out.add(r)
    return out


def _check_writable_file(p: Path) -> None:
    if p.is_dir():
        raise OutputError(f"{p} is a folder; give a file name")
    a = p.parent
    while not a.exists():
        if a.parent == a:
            break
        a = a.parent
    if not a.is_dir():
        raise OutputError(f"cannot create the output folder {p.parent}: {a} is a file; choose another path with -o")
    if not os.access(a, os.W_OK):
        raise OutputError(f"the output folder {a} is not writable; choose a writable path with -o")


def guard_outputs(inputs, files=(), folders=()) -> None:
    """Refuse, before any work, outputs that would replace an input.

    ``inputs`` are the command's input files and folders (every file inside an input folder is
    protected), resolved through symlinks. ``files`` are the exact files the command writes;
    ``folders`` are output folders the command fills with files of its own choosing, so they must
    not hold any input. Output locations must also be creatable and writable. Nothing is created.
    """
    protected = input_files(inputs)
    for f in files:
        if f is None:
            continue
        r = _real(f)
        if r in protected:
            also = "" if r == os.path.abspath(f) else f" ({r})"
            raise OutputError(f"refusing to overwrite the input {f}{also}; choose another output path with -o")
        _check_writable_file(Path(f))
    for d in folders:
        if d is None:
            continue
        r = _real(d)
        hit = sorted(q for q in protected if q == r or q.startswith(r.rstrip(os.sep) + os.sep))
        if hit:
            raise OutputError(f"refusing to write into {d}: it holds the input {hit[0]}, which the outputs could "
                              "overwrite; choose another output folder with -o")
        if Path(d).exists() and not Path(d).is_dir():
            raise OutputError(f"{d} is a file; give a folder for the outputs")
        _check_writable_file(Path(d) / "x")


def check_output(path: str | os.PathLike, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Validate an output file path: its folder must be creatable and writable, and it must not be
    (a file inside) an input. Nothing is created."""
    guard_outputs(inputs, files=[path])
    return Path(path)


# ----------------------------------------------------------------------------- atomic writes
_CREATED: list[list[Path]] = []  # files and folders made by the running command (see output_transaction)


@contextlib.contextmanager
def output_transaction() -> Iterator[None]:
    """Remove the files (and empty folders) that atomic writes created inside the block when it
    fails, so a failed command leaves no partial set of outputs. Files that existed before are left."""
    _CREATED.append([])
    try:
        yield
    except Exception:
        for q in reversed(_CREATED[-1]):
            with contextlib.suppress(OSError):
                q.rmdir() if q.is_dir() else q.unlink()
        raise
    finally:
        _CREATED.pop()


def _mkdirs(d: Path, track: bool) -> None:
    missing = []
    a = d
    while not a.exists() and a.parent != a:
        missing.append(a)
        a = a.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {d}: {e.strerror}; choose a writable path") from None
    if track and _CREATED:
        _CREATED[-1].extend(reversed(missing))


# how torch.save reports a failed write (full disk, file size limit): RuntimeError, not OSError
_WRITE_FAILURE = re.compile(r"writ|iostream|inline_container|file too large|no space", re.IGNORECASE)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, track: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on error delete it.

    A write error (full disk, quota, file size limit) becomes one :class:`OutputError`. With
    ``track``, a file this creates is removed again if the surrounding :func:`output_transaction`
    fails (resume checkpoints pass ``track=False``).
    """
    p = Path(path)
    _check_writable_file(p)
    _mkdirs(p.parent, track)
    existed = p.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise OutputError(f"cannot write in {p.parent}: {e.strerror}; choose a writable path with -o") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and writers may recreate the file)
        os.replace(tmp, p)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (OSError, SafetensorError)) or (isinstance(e, RuntimeError) and _WRITE_FAILURE.search(str(e))):
            why = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise OutputError(f"could not write {p}: {why}; free some space or choose another output path "
                              "(nothing was left behind)") from None
        raise
    if track and not existed and _CREATED:
        _CREATED[-1].append(p)


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


def model_spec(model: nn.Module, extra: dict | None = None, arch: str | None = None,
               arch_args: dict | None = None, input_size: int | None = None) -> dict:
    """The JSON spec written next to a model's weights (``arch`` names a model built outside
    :func:`create_model`; see :func:`save_model`). ``input_size`` defaults to the size recorded
    with the model (:func:`metaprune.models.registry.set_input_size`), if any."""
    spec = arch_spec(model) if arch is None else named_spec(model, arch, arch_args)
    if input_size is None:
        input_size = (getattr(model, ARCH_ATTR, None) or {}).get("input_size")
    out = {
        "format_version": FORMAT_VERSION,
        "arch": spec["arch"],
        "arch_args": spec["args"],
        "widths": get_widths(model),
        "metaprune_version": __version__,
        "extra": extra or {},
    }
    if input_size is not None:
        out["input_size"] = _check_input_size(input_size, "input_size", ConfigError)
    return out


def _check_input_size(v: Any, what: str, error: type[MetapruneError] = ModelFileError) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INPUT_SIZE:
        raise error(f"{what} must be an integer in 1..{MAX_INPUT_SIZE} (pixels), not {v!r}")
    return v


def _meta_model(arch: str, args: dict, label: str = "") -> nn.Module:
    """``arch`` built with ``args`` on the meta device; a builder failure is a :class:`ConfigError`
    ("cannot be built with {label}{args}")."""
    try:
        with torch.device("meta"):
            return create_model(arch, **args)
    except MetapruneError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ConfigError(f"architecture {arch!r} cannot be built with {label}{args} ({str(e)[:160]})") from None


def named_spec(model: nn.Module, arch: str, arch_args: dict | None = None) -> dict:
    """The ``{"arch", "args"}`` spec of a module built outside :func:`create_model` (a torchvision or
    timm model, pruned or not), checked: ``arch`` built with ``arch_args`` on the meta device must
    have the same tensor names as ``model`` (widths may differ: they are stored separately)."""
    args = dict(arch_args or {})
    ref = _meta_model(arch, args, "arch_args ")
    want, have = set(ref.state_dict()), set(model.state_dict())
    if want != have:
        raise ConfigError(f"the model is not a {arch!r} built with {args}: tensors missing "
                          f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}; name the architecture "
                          "the model was built with")
    return arch_spec(ref)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None,
               inputs: tuple = (), arch: str | None = None, arch_args: dict | None = None,
               input_size: int | None = None) -> Path:
    """Write ``model`` as ``.safetensors`` with its architecture spec and widths in the metadata.

    ``path`` may be a folder (``model.safetensors`` is written inside). The write is atomic, and
    ``inputs`` lists files that must not be overwritten. A module built outside
    :func:`create_model` (e.g. ``torchvision.models.mobilenet_v2(num_classes=10)``, pruned or not)
    is saved by naming its architecture: ``arch="torchvision:mobilenet_v2", arch_args={"num_classes":
    10, "image_size": 64}``. ``input_size`` is the input height = width the model was trained / pruned
    at (default: the size recorded with the model, e.g. by :func:`load_model`; none for a fresh one).
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / MODEL_FILENAME
    check_output(p, inputs)
    spec = model_spec(model, extra, arch, arch_args, input_size)
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
    except (json.JSONDecodeError, RecursionError):
        raise ModelFileError(f"{path}: the metaprune metadata is corrupt (not JSON)") from None


# ----------------------------------------------------------------------------- validation helpers
def json_type(v: Any) -> str:
    """The JSON name of a Python value's type (for error messages)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "an object",
               list: "a list", type(None): "null"}


def check_json_object(obj: Any, what: str, required: dict[str, Any] | None = None,
                      optional: dict[str, Any] | None = None, allow_extra: bool = False,
                      error: type[MetapruneError] = ModelFileError) -> dict:
    """Check that ``obj`` is a JSON object whose keys have the given types.

    ``required`` / ``optional`` map key -> type or tuple of types (``int`` excludes ``bool``,
    ``float`` accepts ints). Unknown keys are refused unless ``allow_extra``. Raises ``error``
    with a message naming ``what``, the key and the type found. Returns ``obj``.
    """
    required, optional = required or {}, optional or {}
    if not isinstance(obj, dict):
        raise error(f"{what} must be a JSON object, not {json_type(obj)}; the file is corrupt or was edited")
    for k in required:
        if k not in obj:
            raise error(f"{what} lacks {k!r}; the file is corrupt, truncated or not a metaprune file")
    for k, v in obj.items():
        if k not in required and k not in optional:
            if allow_extra:
                continue
            raise error(f"{what} has an unknown key {k!r} (known: {', '.join(sorted({**required, **optional}))}); "
                        "the file is corrupt or from another program")
        types = required.get(k, optional.get(k))
        types = types if isinstance(types, tuple) else (types,)
        ok = any((isinstance(v, t) and not (t in (int, float) and isinstance(v, bool)))
                 or (t is float and isinstance(v, int) and not isinstance(v, bool)) for t in types)
        if not ok:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise error(f"{what}: {k!r} must be {want}, not {json_type(v)} ({v!r:.60}); the file is corrupt or was edited")
    return obj


def check_tensors(tensors: Any, what: str, expected: dict[str, tuple[int, ...]] | None = None,
                  finite: bool = True, error: type[MetapruneError] = ModelFileError) -> dict[str, torch.Tensor]:
    """Check a loaded tensor dict: string keys, tensors only, and (optionally) exactly the
    ``expected`` keys with those shapes, and no NaN/Inf in floating tensors. Returns it."""
    if not isinstance(tensors, dict):
        raise error(f"{what} holds {json_type(tensors)}, not a dict of tensors; the file is corrupt")
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise error(f"{what}: entry {k!r} is not a named tensor; the file is corrupt")
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise error(f"{what} does not fit: missing tensors {missing[:4]}, unexpected {extra[:4]}; "
                        "the file is damaged or belongs to something else")
        for k, shape in expected.items():
            if tuple(tensors[k].shape) != tuple(shape):
                raise error(f"{what}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}; "
                            "the file is damaged or belongs to something else")
    if finite:
        check_finite(tensors, what, error)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], what: str, error: type[MetapruneError] = ModelFileError) -> None:
    """Refuse NaN or Inf in any floating tensor of ``tensors``."""
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel() \
                and not bool(torch.isfinite(v).all()):
            raise error(f"{what}: tensor {k} holds NaN or Inf values; the file is corrupt or the run that "
                        "wrote it diverged")


def load_safetensors(path: str | os.PathLike, what: str | None = None,
                     error: type[MetapruneError] = ModelFileError) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``.safetensors`` file (tensors and string metadata) with one clear error for any damage."""
    p = Path(path)
    what = what or str(p)
    if p.is_dir():
        raise error(f"{what} is a folder, not a .safetensors file")
    if not p.exists():
        raise error(f"{what} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{what} is not a readable safetensors file ({str(e)[:200]}); it may be truncated or "
                    "corrupt") from None
    return tensors, meta


_SPEC_KEYS = {"format_version": int, "arch": str}
_SPEC_OPTIONAL = {"arch_args": dict, "widths": dict, "metaprune_version": str, "extra": dict, "input_size": int}
_ARG_TYPES = (int, float, str, bool, type(None))


def validate_model_spec(spec: Any, path: str = "<memory>") -> dict:
    """Validate the metadata of a model file (types, names, format version) before anything is built."""
    what = f"{path}: the model metadata"
    check_json_object(spec, what, _SPEC_KEYS, _SPEC_OPTIONAL)
    fv = spec["format_version"]
    if fv > FORMAT_VERSION:
        raise ModelFileError(f"{path} has format_version {fv}, newer than this metaprune ({FORMAT_VERSION}); "
                             "upgrade metaprune")
    if fv < 1:
        raise ModelFileError(f"{what}: format_version {fv} is not a valid version (1..{FORMAT_VERSION})")
    if "input_size" in spec:
        _check_input_size(spec["input_size"], f"{what}: 'input_size'")
    try:
        entry = get_entry(spec["arch"])
    except MetapruneError as e:
        raise ModelFileError(f"{path}: {e}") from None
    args = spec.get("arch_args", {})
    for k, v in args.items():
        if not isinstance(v, _ARG_TYPES):
            raise ModelFileError(f"{what}: arch_args[{k!r}] must be a number, string or boolean, not {json_type(v)}")
        if k in ("num_classes", "in_chans", "image_size") and (isinstance(v, bool) or not isinstance(v, int)
                                                                or not 1 <= v <= 1 << 20):
            raise ModelFileError(f"{what}: arch_args[{k!r}] must be a positive integer, not {v!r}")
    params = inspect.signature(entry.builder).parameters
    unknown = [k for k in args if k not in params]
    if unknown:
        raise ModelFileError(f"{what}: architecture {spec['arch']!r} does not take {unknown}; the metadata is "
                             "corrupt or was written for another architecture")
    return spec


def _example_input(model: nn.Module, spec: dict) -> torch.Tensor:
    args = spec.get("arch_args", {})
    size = args.get("image_size") or get_entry(spec["arch"]).default_image_size
    return torch.zeros(1, args.get("in_chans", 3), size, size, device="meta")


def build_from_spec(spec: dict, state_dict: dict[str, torch.Tensor], path: str = "<memory>") -> nn.Module:
    """Rebuild the module described by ``spec`` and load ``state_dict`` into it strictly.

    Everything is validated before any real memory is used: the metadata (types, names, format
    version), the layer widths (only structural attributes, positive integers), every tensor's
    name and shape against the architecture at those widths (including a forward pass on the
    ``meta`` device, which checks that consecutive layers connect) and that weights are finite.
    The module is built on the ``meta`` device (no random initialisation) and takes over the
    tensors.
    """
    validate_model_spec(spec, path)
    check_tensors(state_dict, f"{path}: the weights")
    return _take_over(_meta_from_spec(spec, state_dict, path), spec, state_dict, path)


def _meta_from_spec(spec: dict, shapes: dict[str, torch.Tensor], path: str) -> nn.Module:
    """The architecture of a validated ``spec`` built on the meta device at its widths, checked against
    ``shapes`` (tensors or meta placeholders: only names and shapes are read): every tensor name and
    shape, and a meta forward pass (consecutive layers connect). No tensor data is needed."""
    arch = spec["arch"]
    try:
        with torch.device("meta"):
            model = create_model(arch, **spec.get("arch_args", {}))
    except MetapruneError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelFileError(f"{path}: architecture {arch!r} cannot be built with arch_args "
                             f"{spec.get('arch_args', {})} ({str(e)[:160]}); the metadata is corrupt") from None
    apply_widths(model, spec.get("widths", {}), shapes, where=path)
    ref = model.state_dict(keep_vars=True)
    missing = sorted(set(ref) - set(shapes))
    unexpected = sorted(set(shapes) - set(ref))
    if missing or unexpected:
        raise ModelFileError(f"{path}: the weights do not fit architecture {arch!r} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the file is damaged or belongs to another model")
    for k, t in ref.items():
        if tuple(t.shape) != tuple(shapes[k].shape):
            raise ModelFileError(f"{path}: tensor {k} has shape {tuple(shapes[k].shape)}, architecture {arch!r} "
                                 f"needs {tuple(t.shape)}")
    try:
        with torch.no_grad():
            model.eval()(_example_input(model, spec))
    except Exception as e:  # noqa: BLE001 - any failure means the stored widths do not connect
        raise ModelFileError(f"{path}: the layer shapes do not connect into a working {arch!r} "
                             f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); the widths or "
                             "tensor shapes are corrupt") from None
    return model


def _take_over(model: nn.Module, spec: dict, state_dict: dict[str, torch.Tensor], path: str) -> nn.Module:
    """``model`` (from :func:`_meta_from_spec`) holding the checked ``state_dict``'s tensors, with the
    spec's recorded input size."""
    ref = model.state_dict(keep_vars=True)
    sd = _with_versions(model, {k: v.to(ref[k].dtype) if v.dtype != ref[k].dtype else v
                                for k, v in state_dict.items()})
    model.load_state_dict(sd, strict=True, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:  # a buffer outside the state dict (non-persistent): build the ordinary way
        model = create_model(spec["arch"], **spec.get("arch_args", {}))
        apply_widths(model, spec.get("widths", {}), state_dict, where=path)
        model.load_state_dict(_with_versions(model, sd), strict=True)
    return set_input_size(model, spec.get("input_size") or _legacy_input_size(spec))


#: the image size of the built-in datasets, for files written before ``input_size`` was recorded
_DATA_SIZES = {"fashion-mnist": 28, "cifar10": 32, "cifar100": 32}


def _legacy_input_size(spec: dict) -> int | None:
    """The input size of a file without ``input_size``: that of the built-in dataset (or task) its
    ``extra.data`` names, if any; else None (the architecture's default applies)."""
    data = (spec.get("extra") or {}).get("data")
    if not isinstance(data, str):
        return None
    if data in _DATA_SIZES:
        return _DATA_SIZES[data]
    try:
        from metaprune.data.tasks import get_task

        return _DATA_SIZES.get(get_task(data).base)
    except Exception:  # noqa: BLE001 - not a registered task: unknown
        return None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(path: str | os.PathLike, what: str | None = None,
                       error: type[MetapruneError] = ModelFileError) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and, for every tensor, a meta-device placeholder of its shape and dtype, read from a
    ``.safetensors`` header only (no tensor data is read), so a file's structure is validated before
    anything is materialised. A damaged header raises ``error``."""
    what = what or str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            out = {}
            for k in f.keys():  # noqa: SIM118 - safe_open has no items()
                sl = f.get_slice(k)
                out[k] = torch.empty(tuple(sl.get_shape()), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32),
                                     device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise error(f"{what} is not a readable safetensors file ({str(e).splitlines()[0][:200] if str(e) else e!r}); "
                    "it may be truncated or corrupt") from None
    return meta, out


def runs_at(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Why ``model`` cannot take one input of ``input_shape`` (C, H, W), or None when it can: a forward
    on the meta device (nothing is computed or changed), and when that is inconclusive (code that
    needs values) a real one in eval mode."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            functional_call(model, state, (torch.zeros(1, *input_shape, device="meta"),))
        return None
    except Exception:  # noqa: BLE001 - data-dependent code cannot run on meta; try for real
        pass
    training = model.training
    try:
        dev = next(iter(model.parameters()), torch.empty(0)).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=dev))
        return None
    except Exception as e:  # noqa: BLE001 - any failure: the model does not take this input
        return str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    finally:
        model.train(training)


def _with_versions(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with the module versions torch.save would have stored (``_metadata``): safetensors keeps
    none, and some modules (torchvision's MNASNet) refuse a state dict without them."""
    out = OrderedDict(sd)
    out._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        why = str(e).splitlines()[0][:200] if str(e).strip() else ("empty file" if p.stat().st_size == 0
                                                                    else type(e).__name__)
        raise ModelFileError(f"{p} is not a readable PyTorch file ({why}); it may be truncated or corrupt") from None


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


def _prefix_normalised(sd: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def _head_tensor(sd: dict, name: str | None) -> torch.Tensor | None:
    if not name:
        return None
    t = sd.get(name + ".weight", sd.get(name + ".bias"))
    return t if isinstance(t, torch.Tensor) and t.dim() >= 1 else None


def load_state_dict_as(state_dict: dict[str, torch.Tensor], arch: str, arch_args: dict | None = None,
                       path: str = "<state dict>") -> nn.Module:
    """Build ``arch`` (a registry name, ``torchvision:NAME``, ``timm:NAME``...) for a bare state dict,
    pruned or not: ``num_classes`` / ``in_chans`` default to what the classifier and first
    convolution's tensors say, the layer widths are read from the tensor shapes, and the result is
    loaded through :func:`build_from_spec` (all its checks). A state dict of another architecture
    raises :class:`ModelFileError` naming the tensors that do not fit."""
    from metaprune.models import model_facts

    sd = _prefix_normalised(state_dict)
    args = {k: v for k, v in (arch_args or {}).items() if v is not None}
    size = args.get("image_size")
    if size is not None and "image_size" not in inspect.signature(get_entry(arch).builder).parameters:
        del args["image_size"]  # a builder without it (cifar_resnet20): only the recorded input size
    try:
        facts = model_facts(arch)
    except MetapruneError:
        raise
    except Exception as e:  # noqa: BLE001 - a builder that cannot even be probed
        raise ConfigError(f"architecture {arch!r} cannot be built ({str(e)[:160]})") from None
    head, first = _head_tensor(sd, facts.classifier), _head_tensor(sd, facts.first_conv)
    if head is not None:
        if "num_classes" in args and args["num_classes"] != head.shape[0]:
            raise ModelFileError(f"{path}: the classifier {facts.classifier} has {head.shape[0]} outputs, not "
                                 f"--num-classes {args['num_classes']}; leave --num-classes out or fix it")
        args.setdefault("num_classes", int(head.shape[0]))
    if first is not None and first.dim() == 4:
        if "in_chans" in args and args["in_chans"] != first.shape[1]:
            raise ModelFileError(f"{path}: the first convolution {facts.first_conv} takes {first.shape[1]} input "
                                 f"channels, not --in-chans {args['in_chans']}; leave --in-chans out or fix it (grey "
                                 "data for a colour model: --repeat-channels)")
        args.setdefault("in_chans", int(first.shape[1]))
    base = _meta_model(arch, args)
    ref = base.state_dict()
    want = {k for k in ref if not k.endswith("num_batches_tracked")}
    have = {k for k in sd if not k.endswith("num_batches_tracked")}
    if want != have:
        raise ModelFileError(f"{path}: the state dict does not fit architecture {arch!r} (missing "
                             f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]} of {len(have)} "
                             "tensors); pass the --arch the weights were saved from")
    try:
        widths = _widths_from_shapes(base, sd)
    except (IndexError, ValueError, KeyError, RuntimeError, ZeroDivisionError) as e:
        raise ModelFileError(f"{path}: the tensors have the names of {arch!r} but shapes that do not fit it "
                             f"({str(e)[:160]}); pass the --arch the weights were saved from") from None
    spec = {"format_version": FORMAT_VERSION, "arch": arch, "arch_args": arch_spec(base)["args"], "widths": widths}
    if size is not None:
        spec["input_size"] = size
    full = {**{k: torch.zeros((), dtype=torch.long) for k in ref if k.endswith("num_batches_tracked")}, **sd}
    return build_from_spec(spec, full, path)


_TV_KEYS: dict[str, frozenset | None] = {}


def _tv_keys(name: str) -> frozenset | None:
    """Tensor names of torchvision builder ``name`` (built once on the meta device; cached)."""
    if name not in _TV_KEYS:
        try:
            with torch.device("meta"):
                m = create_model(f"torchvision:{name}")
            _TV_KEYS[name] = frozenset(k for k in m.state_dict() if not k.endswith("num_batches_tracked"))
        except Exception:  # noqa: BLE001 - a builder that does not build is not a candidate
            _TV_KEYS[name] = None
    return _TV_KEYS[name]


def _tv_candidates(keys: frozenset) -> list[str]:
    """torchvision builders with exactly these tensor names. One builder per torchvision module
    (family) is built first; the rest of a family only when its top-level module names match."""
    import torchvision.models as tvm

    from metaprune.models.ecosystem import torchvision_names

    families: dict[str, list[str]] = {}
    for n in torchvision_names():
        families.setdefault(tvm.get_model_builder(n).__module__, []).append(n)
    tops = {k.split(".")[0] for k in keys}
    out = []
    for names in families.values():
        first = _tv_keys(names[0])
        if first is None or {k.split(".")[0] for k in first} != tops:
            continue
        out += [n for n in names if _tv_keys(n) == keys]
    return out


def _match_torchvision(state_dict: dict, path: str) -> nn.Module | None:
    sd = _prefix_normalised(state_dict)
    keys = frozenset(k for k in sd if not k.endswith("num_batches_tracked"))
    cands = _tv_candidates(keys)
    errors = []
    for n in cands:  # same names (resnet50 / wide_resnet50_2 / resnext50): the one whose shapes fit as built first
        with torch.device("meta"):
            ref = create_model(f"torchvision:{n}")
        same = all(tuple(t.shape) == tuple(sd[k].shape) for k, t in ref.state_dict().items()
                   if k in sd and not k.startswith(tuple(filter(None, [_tv_head(n)]))))
        if same:
            cands = [n] + [c for c in cands if c != n]
            break
    for n in cands:
        try:
            return load_state_dict_as(sd, f"torchvision:{n}", None, path)
        except MetapruneError as e:
            errors.append(f"torchvision:{n}: {e}")
    if errors:
        raise ModelFileError(f"{path}: the tensor names are those of {', '.join(f'torchvision:{c}' for c in cands)} "
                             f"but the shapes fit none ({errors[0][:200]}); pass --arch")
    return None


def _tv_head(name: str) -> str | None:
    from metaprune.models import model_facts

    return model_facts(f"torchvision:{name}").classifier


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
        if isinstance(m, nn.modules.conv._ConvNd) and w is not None and not m.transposed:  # noqa: SLF001
            if m.groups > 1 and m.groups == m.in_channels == m.out_channels and w.shape[1] == 1:  # depthwise
                widths[name].update(out_channels=int(w.shape[0]), in_channels=int(w.shape[0]), groups=int(w.shape[0]))
            else:
                widths[name].update(out_channels=int(w.shape[0]), in_channels=int(w.shape[1]) * m.groups)
        elif isinstance(m, nn.Linear) and w is not None:
            widths[name].update(out_features=int(w.shape[0]), in_features=int(w.shape[1]))
        elif isinstance(m, nn.modules.batchnorm._NormBase) and pre + "running_mean" in sd:  # noqa: SLF001
            widths[name].update(num_features=int(sd[pre + "running_mean"].shape[0]))
        elif isinstance(m, nn.modules.batchnorm._NormBase) and w is not None:  # noqa: SLF001
            widths[name].update(num_features=int(w.shape[0]))
        elif isinstance(m, nn.LayerNorm) and w is not None:
            widths[name].update(normalized_shape=list(w.shape))
        elif isinstance(m, nn.GroupNorm) and w is not None:
            widths[name].update(num_channels=int(w.shape[0]))
        elif isinstance(m, nn.MultiheadAttention) and pre + "in_proj_weight" in sd:
            e = int(sd[pre + "in_proj_weight"].shape[1])
            widths[name].update(embed_dim=e, kdim=e, vdim=e, head_dim=max(1, e // m.num_heads))
        elif hasattr(m, "num_heads") and hasattr(m, "head_dim") and pre + "qkv.weight" in sd:  # (Swin: heads kept)
            widths[name].update(num_heads=max(1, int(sd[pre + "qkv.weight"].shape[0]) // (3 * m.head_dim)))
        elif hasattr(m, "n_heads") and pre + "to_qkv.weight" in sd:  # MaxViT: the head size follows the width
            widths[name].update(head_dim=max(1, int(sd[pre + "to_qkv.weight"].shape[1]) // m.n_heads))
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
            try:
                args = _arch_args_from_shapes(name, sd, base)
                with torch.device("meta"):
                    shaped = create_model(name, **args)
                widths = _widths_from_shapes(shaped, sd)
            except (IndexError, ValueError, KeyError, RuntimeError, ZeroDivisionError, MetapruneError) as e:
                raise ModelFileError(f"{path}: the tensors have the names of {name!r} but shapes that do not fit it "
                                     f"({str(e)[:160]}); the file is damaged") from None
            spec = {"format_version": FORMAT_VERSION, "arch": name, "arch_args": args, "widths": widths}
            full = {**{k: v for k, v in shaped.state_dict().items() if k.endswith("num_batches_tracked")}, **sd}
            full = {k: (torch.zeros((), dtype=torch.long) if v.is_meta else v) for k, v in full.items()}
            return build_from_spec(spec, full, path)
        scores.append((len(base_keys & keys) / max(1, len(base_keys | keys)), name))
    best = ", ".join(f"{n} ({s:.0%} of keys shared)" for s, n in sorted(scores, reverse=True)[:3])
    tv = _match_torchvision(state_dict, path)
    if tv is not None:
        return tv
    raise ModelFileError(f"{path}: the state dict ({len(keys)} tensors) matches no registered or torchvision "
                         f"architecture (closest: {best}); pass --arch (torchvision:NAME, timm:NAME, a registered "
                         "name, or pkg.module:factory with --trust-code), or arch= in load_model")


_ARCH_HINT: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("metaprune_arch", default=None)


_INPUT_SIZE_HINT: contextvars.ContextVar[int | None] = contextvars.ContextVar("metaprune_input_size", default=None)


@contextlib.contextmanager
def arch_for_state_dicts(arch: str | None, arch_args: dict | None = None,
                         input_size: int | None = None) -> Iterator[None]:
    """Within the block, :func:`load_model` builds bare state dicts as ``arch`` (the CLI's ``--arch``)
    and gives every model it loads ``input_size`` (the CLI's ``--input-size``) when that is given."""
    tok = _ARCH_HINT.set((arch, dict(arch_args or {})) if arch else None)
    tok2 = _INPUT_SIZE_HINT.set(input_size)
    try:
        yield
    finally:
        _INPUT_SIZE_HINT.reset(tok2)
        _ARCH_HINT.reset(tok)


def load_model(path: str | os.PathLike, trust_pickle: bool = False,
               map_location: str | torch.device = "cpu", arch: str | None = None,
               arch_args: dict | None = None, input_size: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load a model file: metaprune ``.safetensors`` (spec + widths), a bare state dict in
    ``.safetensors``/``.pt`` (matched to a registered or torchvision architecture by keys and shapes,
    or built as ``arch`` with ``arch_args`` when given), or with ``trust_pickle`` a pickled module.
    A metaprune file's own metadata wins over ``arch``. ``input_size`` (pixels; the CLI's
    ``--input-size``) replaces the input size the file records (the size used for MACs, latency,
    export and graphs when no data is given); the model must run at it. Returns ``(model, info)``;
    eval mode.

    A metaprune ``.safetensors`` file is validated from its header first (metadata, tensor names and
    shapes against the architecture at its widths); tensor data is read only when all of that fits.
    """
    if arch is None and _ARCH_HINT.get() is not None:
        arch, arch_args = _ARCH_HINT.get()
    if input_size is None:
        input_size = _INPUT_SIZE_HINT.get()
    p = _resolve(path)
    model, info = _load_model(p, trust_pickle, arch, arch_args)
    if input_size is not None and input_size != recorded_input_size(model):
        _check_input_size(input_size, "--input-size", ConfigError)
        shape = (info.arch_args.get("in_chans", 3), input_size, input_size)
        why = runs_at(model, shape)
        if why is not None:
            raise ConfigError(f"{p}: the model does not run at --input-size {input_size} ({why}); leave --input-size "
                              f"out (it records {recorded_input_size(model)} px) or give a size it takes")
        set_input_size(model, input_size)
    return model.eval().to(map_location), info


def _load_model(p: Path, trust_pickle: bool, arch: str | None, arch_args: dict | None) -> tuple[nn.Module, ModelInfo]:
    spec = read_spec(p) if p.suffix == ".safetensors" else None
    if spec is not None:  # the header first: nothing is read or built from tensor data until it fits
        validate_model_spec(spec, str(p))
        _, shapes = safetensors_header(p)
        model = _meta_from_spec(spec, shapes, str(p))
        obj, fmt = load_state_dict_file(p, trust_pickle)
        check_tensors(obj, f"{p}: the weights")
        model = _take_over(model, spec, obj, str(p))
        return model, ModelInfo(str(p), spec["arch"], arch_spec(model)["args"], spec.get("extra", {}), fmt)
    obj, fmt = load_state_dict_file(p, trust_pickle)
    if isinstance(obj, nn.Module):
        model = obj
        check_finite(model.state_dict(), str(p))
        try:
            model = (load_state_dict_as(obj.state_dict(), arch, arch_args, str(p)) if arch
                     else match_architecture(obj.state_dict(), str(p)))
        except ModelFileError:
            setattr(model, ARCH_ATTR, {"arch": type(obj).__name__, "args": {}})
        extra = {}
    else:
        if isinstance(obj, dict) and "metaprune" in obj and "model" in obj:
            spec = obj["metaprune"]
            model = build_from_spec(spec, obj["model"], str(p))
            return model, ModelInfo(str(p), spec["arch"], spec.get("arch_args", {}), spec.get("extra", {}), fmt)
        sd = _unwrap_checkpoint(obj)
        model = load_state_dict_as(sd, arch, arch_args, str(p)) if arch else match_architecture(sd, str(p))
        extra = {}
    spec_now = arch_spec(model)
    return model, ModelInfo(str(p), spec_now["arch"], spec_now["args"], extra, fmt)
