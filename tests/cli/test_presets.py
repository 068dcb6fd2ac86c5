"""Every shipped preset in configs/ names only options that exist for its commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaprune.cli import build_parser
from metaprune.cli.common import _subparser

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_sections_match_the_cli(path):
    cfg = yaml.safe_load(path.read_text())
    parser = build_parser()
    sections = {k: v for k, v in cfg.items() if isinstance(v, dict)}
    assert sections, f"{path.name} has no command sections"
    for command, options in sections.items():
        dests = {a.dest for a in _subparser(parser, command)._actions}
        unknown = sorted(k.replace("-", "_") for k in options if k.replace("-", "_") not in dests)
        assert not unknown, f"{path.name} [{command}]: unknown options {unknown}"
