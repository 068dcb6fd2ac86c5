"""Metanetwork checkpoints: ``metanet.safetensors`` (weights) + ``config.json`` (shape, provenance).

No pickle: the config is JSON and the weights are safetensors, so loading runs no code.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaprune.errors import ConfigError, ModelFileError
from metaprune.fingerprint import all_finite
from metaprune.io import atomic_path, read_json, write_json
from metaprune.metanet.config import MetanetConfig
from metaprune.metanet.model import Metanet

WEIGHTS = "metanet.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def save_metanet(net: Metanet, out_dir: str | os.PathLike, extra: dict | None = None,
                 weights_name: str = WEIGHTS) -> Path:
    """Write ``net`` into ``out_dir`` (weights, then config), atomically. Returns the weights path."""
    d = Path(out_dir)
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if not all_finite(sd.values()):
        raise ModelFileError("the metanetwork holds NaN or infinite weights; refusing to save it")
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / weights_name) as tmp:
        save_file(sd, str(tmp))
    write_json(d / CONFIG, {"format_version": FORMAT_VERSION, "metanet": net.cfg.to_dict(), **(extra or {})})
    return d / weights_name


def load_metanet(path: str | os.PathLike, weights_name: str = WEIGHTS) -> tuple[Metanet, dict]:
    """Load a metanetwork folder written by :func:`save_metanet`; returns ``(net, config json)``."""
    d = Path(path)
    if d.is_file():
        d, weights_name = d.parent, d.name
    if not (d / CONFIG).exists() or not (d / weights_name).exists():
        raise ModelFileError(f"{d} is not a metanetwork folder (needs {CONFIG} and {weights_name}); "
                             "train one with `metaprune meta-train` or use the shipped default")
    meta = read_json(d / CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("metanet"), dict):
        raise ModelFileError(f"{d / CONFIG} is not a metanetwork config (it needs a `metanet` object); the folder is "
                             "damaged or not a metanetwork folder")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{d / CONFIG}: format_version must be an integer, got {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{d / CONFIG} has format_version {version}; upgrade metaprune")
    unknown = sorted(set(meta["metanet"]) - {f.name for f in fields(MetanetConfig)})
    if unknown:
        raise ModelFileError(f"{d / CONFIG}: unknown metanetwork options {unknown}; the file is damaged or was written "
                             "by another program")
    try:
        net = Metanet(MetanetConfig.from_dict(meta["metanet"]))
    except ConfigError as e:
        raise ModelFileError(f"{d / CONFIG}: invalid metanetwork config ({e}); the file is damaged") from None
    try:
        sd = load_file(str(d / weights_name))
        net.load_state_dict(sd, strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFileError(f"{d / weights_name} does not hold this metanetwork's weights ({str(e)[:200]}); "
                             "the folder is damaged or mixed up") from None
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"{d / weights_name} holds NaN or infinite weights ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); the metanetwork is broken: use another one")
    return net.eval(), meta
