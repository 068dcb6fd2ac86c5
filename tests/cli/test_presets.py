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


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_values_have_their_options_types(path):
    """Every value passes the check `--config` applies (type, choices, switch), so no shipped preset breaks."""
    from metaprune.cli.common import _coerce

    cfg = yaml.safe_load(path.read_text())
    parser = build_parser()
    for command, options in cfg.items():
        if not isinstance(options, dict):
            continue
        actions = {a.dest: a for a in _subparser(parser, command)._actions}
        for k, v in options.items():
            _coerce(actions.get(k.replace("-", "_")), k, v, path)


def test_config_values_are_checked_and_converted(tmp_path, capsys):
    from metaprune.cli import main

    cfg = tmp_path / "p.yaml"
    cfg.write_text("eval:\n  no_latency: yes please\n")
    assert main(["eval", "--config", str(cfg), "--data", "synthetic"]) == 2
    assert "switch" in capsys.readouterr().err
    cfg.write_text("train:\n  epochs: abc\n")
    assert main(["train", "--config", str(cfg), "--model", "cifar_resnet20", "-o", str(tmp_path / "o")]) == 2
    assert "epochs (--epochs) must be an integer, not 'abc'" in capsys.readouterr().err
    cfg.write_text("train:\n  epochs: 2.5\n")
    assert main(["train", "--config", str(cfg), "--model", "cifar_resnet20", "-o", str(tmp_path / "o")]) == 2
    cfg.write_text("train:\n  schedule: sometimes\n")
    assert main(["train", "--config", str(cfg), "--model", "cifar_resnet20", "-o", str(tmp_path / "o")]) == 2
    assert "one of" in capsys.readouterr().err
    cfg.write_text("^\n")  # a bare string, not a mapping
    assert main(["train", "--config", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert "must be a mapping" in capsys.readouterr().err
    cfg.write_text("train:\n  epochs: [1, 2\n")
    assert main(["train", "--config", str(cfg), "-o", str(tmp_path / "o")]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_strings_convert_to_the_option_type():
    """YAML reads `1e-3` as a string: it becomes the float the option takes."""
    import argparse

    from metaprune.cli.common import _coerce

    act = argparse.ArgumentParser().add_argument("--lr", type=float)
    assert _coerce(act, "lr", "1e-3", Path("p.yaml")) == 1e-3


@pytest.mark.parametrize("command,value,ok", [("prune", True, True), ("prune", False, True), ("prune", "auto", True),
                                              ("curve", False, True), ("curve", "auto", False),
                                              ("curve", "false", False), ("prune", "yes", False)])
def test_preset_reconstruct_switch(command, value, ok):
    """`reconstruct` is a --x / --no-x switch: true / false (and auto where that is its default, prune)."""
    from metaprune.cli.common import _coerce
    from metaprune.errors import ConfigError

    action = next(a for a in _subparser(build_parser(), command)._actions if a.dest == "reconstruct")
    if ok:
        assert _coerce(action, "reconstruct", value, Path("p.yaml")) is value
    else:
        with pytest.raises(ConfigError, match="switch"):
            _coerce(action, "reconstruct", value, Path("p.yaml"))
