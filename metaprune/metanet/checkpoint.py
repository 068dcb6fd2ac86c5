"""Metanetwork checkpoints: ``metanet.safetensors`` (weights) + ``config.json`` (shape, provenance).

No pickle: the config is JSON and the weights are safetensors, so loading runs no code.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaprune.errors import ModelFileError
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
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
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
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{d / CONFIG} has format_version {meta['format_version']}; upgrade metaprune")
    net = Metanet(MetanetConfig.from_dict(meta["metanet"]))
    try:
        sd = load_file(str(d / weights_name))
        net.load_state_dict(sd, strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFileError(f"{d / weights_name} does not hold this metanetwork's weights ({str(e)[:200]}); "
                             "the folder is damaged or mixed up") from None
    return net.eval(), meta
