"""Run fingerprints for resume checkpoints, and checks of numeric options.

A resume checkpoint (``last.pt`` of ``train`` / ``finetune`` / ``zoo`` / ``prune --finetune-epochs``
and of ``meta-train``) stores the *fingerprint* of the run that wrote it: a small JSON-able dict
naming what the run starts from (source file hash or initial-weights hash), its training config,
the architecture and widths, and the dataset. A rerun resumes only when its own fingerprint is
the same; otherwise :func:`check_resume` refuses and says which entries differ, so that a folder
holding another run's checkpoint never hands back that run's model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from metaprune.errors import ConfigError, ModelFileError


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values (dicts with string keys, lists, numbers, strings, None)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return canonical(obj.tolist())
    return str(obj)


def fingerprint(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_identity(data) -> dict:
    """What identifies a :class:`metaprune.data.DataSplits`: name, split sizes, shape and a hash of
    three training samples (different subsets or splits of one dataset differ there)."""
    ident = {"name": data.name, "train": len(data.train), "val": len(data.val), "test": len(data.test),
             "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}
    n = len(data.train)
    h = hashlib.sha256()
    try:
        for i in sorted({0, n // 2, n - 1}) if n else ():
            x, y = data.train[i]
            for t in (x, y):
                t = torch.as_tensor(t).detach().cpu().contiguous()
                h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        ident["samples"] = h.hexdigest()
    except Exception:  # noqa: BLE001 - an unusual dataset: the sizes and the name still identify it
        pass
    return ident


def model_identity(model: torch.nn.Module) -> dict:
    """Architecture, its arguments and the layer widths of ``model`` (as saved in model files)."""
    from metaprune.models import get_widths
    from metaprune.models.registry import ARCH_ATTR

    spec = getattr(model, ARCH_ATTR, None) or {"arch": type(model).__name__, "args": {}}
    try:
        widths = get_widths(model)
    except Exception:  # noqa: BLE001 - a module the registry does not know: its parameter shapes
        widths = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"arch": spec.get("arch"), "args": spec.get("args", {}), "widths": widths}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:16] + "..." + s[-8:]


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints, e.g. ``"config.lr: 0.1 -> 0.05"``;
    many differences under one entry (the widths of many layers) are summed up in one line."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:2]), []).append(k)
    order = {"start": 0, "kind": 0, "model": 1, "config": 2, "data": 3}
    out = []
    for g, ks in sorted(groups.items(), key=lambda kv: (order.get(kv[0].split(".")[0], 4), len(kv[1]), kv[0])):
        if len(ks) > 2:
            out.append(f"{g}: {len(ks)} entries differ (e.g. {ks[0]}: {_short(a.get(ks[0], '<absent>'))} -> "
                       f"{_short(b.get(ks[0], '<absent>'))})")
        else:
            out += [f"{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}" for k in ks]
    return out


def check_resume(path: Path, stored: Any, current: dict, what: str = "run") -> None:
    """Refuse to resume from the checkpoint ``path`` unless its stored fingerprint equals ``current``.

    ``stored`` is the JSON string saved in the checkpoint (``None`` for a checkpoint written before
    fingerprints existed).
    """
    hint = ("pass --no-resume to start afresh (the checkpoint is replaced), or write to another output folder "
            "(-o)")
    if not isinstance(stored, str):
        raise ModelFileError(f"{path} is a resume checkpoint without a run fingerprint (an older metaprune wrote it), "
                             f"so it cannot be told whether it belongs to this {what}; {hint}")
    try:
        old = json.loads(stored)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the run fingerprint in the resume checkpoint is corrupt; {hint}") from None
    diff = differences(old, current)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(f"{path} is the resume checkpoint of a different {what} (checkpoint -> now: {shown}); "
                          f"refusing to reuse it: {hint}")


def dumps(fp: dict) -> str:
    """The string stored in a checkpoint."""
    return json.dumps(canonical(fp), sort_keys=True)


# ----------------------------------------------------------------------------- option checks
def check_int(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    """``value`` must be an integer (not a bool) ``>= minimum``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, below: float | None = None, optional: bool = False) -> None:
    """``value`` must be a finite number within the bounds (``above`` / ``below``: strict bounds)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum:g}, got {value:g}")
    if above is not None and value <= above:
        raise ConfigError(f"{name} must be > {above:g}, got {value:g}")
    if below is not None and value >= below:
        raise ConfigError(f"{name} must be < {below:g}, got {value:g}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor in ``tensors`` holds only finite values."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point() or t.is_complex())
