"""The CLI's defaults are the library's: a command run without options builds the config dataclass's defaults."""

import importlib

import pytest
import torch

from metaprune.cli import main
from metaprune.engine.runtime import resolve_device


class _Captured(Exception):
    pass


def _capture(*args, **kw):
    raise _Captured(args, kw)


def _run(argv) -> tuple:
    with pytest.raises(_Captured) as e:
        main(argv)
    return e.value.args


class _Data:
    name = "fashion-mnist"

    def describe(self) -> str:
        return "fake data"


def test_meta_train_defaults(tmp_path, monkeypatch):
    from metaprune.metanet import zoo
    from metaprune.metanet.config import MetanetConfig, MetaTrainConfig

    meta_train = importlib.import_module("metaprune.metanet.meta_train")  # the module (the package exports the function)

    monkeypatch.setattr(meta_train, "meta_train", _capture)
    monkeypatch.setattr(zoo, "load_zoo_data", lambda *a, **k: _Data())
    (tmp_path / "zoo").mkdir()
    (_, _, _, cfg, ncfg), _ = _run(["meta-train", "--zoo", str(tmp_path / "zoo"), "-o", str(tmp_path / "o")])
    assert cfg == MetaTrainConfig()
    assert ncfg == MetanetConfig()
    assert (cfg.prune_aware, cfg.lam, ncfg.edit, ncfg.hidden) == (1.0, 0.5, "scale", 32)  # the shipped recipe


def test_meta_train_score_defaults(tmp_path, monkeypatch):
    from metaprune.metanet import rank
    from metaprune.metanet.config import MetanetConfig

    monkeypatch.setattr(rank, "rank_meta_train", _capture)
    (tmp_path / "zoo").mkdir()
    (_, _, _, cfg, ncfg), _ = _run(["meta-train", "--output-mode", "score", "--zoo", str(tmp_path / "zoo"),
                                    "-o", str(tmp_path / "o")])
    assert cfg == rank.RankTrainConfig()
    assert ncfg == MetanetConfig(output="score")


def test_zoo_defaults(tmp_path, monkeypatch):
    from metaprune.cli import metanet_cmds
    from metaprune.metanet import zoo

    monkeypatch.setattr(zoo, "build_zoo", _capture)
    monkeypatch.setattr(metanet_cmds, "load_data_for", lambda *a, **k: _Data())
    (cfg, _, _), _ = _run(["zoo", "-o", str(tmp_path / "z")])
    assert cfg == zoo.ZooConfig()
    assert cfg.train_subset is None and cfg.train.epochs == 4


def test_prune_defaults(tmp_path, monkeypatch):
    from metaprune.pruning import PruneConfig, pipeline

    monkeypatch.setattr(pipeline, "prune_file", _capture)
    (_, _, cfg), _ = _run(["prune", "--ratio", "0.5", "-o", str(tmp_path / "p")])
    assert cfg == PruneConfig(ratio=0.5)


def test_meta_train_under_torchrun_keeps_each_process_on_its_gpu(tmp_path, monkeypatch):
    """Process 1 of 2 on a 2-GPU machine: the CLI must not hand meta_train a fixed 'cuda:1', which
    resolve_device refuses with several processes per machine (every process would take one GPU)."""
    from metaprune.metanet import zoo

    meta_train = importlib.import_module("metaprune.metanet.meta_train")  # the module (the package exports the function)

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(meta_train, "meta_train", _capture)
    monkeypatch.setattr(zoo, "load_zoo_data", lambda *a, **k: _Data())
    (tmp_path / "zoo").mkdir()
    for flag in ("auto", "cuda"):
        (_, _, _, cfg, _), _ = _run(["meta-train", "--zoo", str(tmp_path / "zoo"), "--device", flag,
                                     "-o", str(tmp_path / "o")])
        assert resolve_device(cfg.device) == torch.device("cuda", 1)


def test_curve_defaults(tmp_path, monkeypatch):
    import inspect

    from metaprune import pruning
    from metaprune.cli import prune_cmds

    monkeypatch.setattr(pruning, "prunability_curve", _capture)
    monkeypatch.setattr(prune_cmds, "load_data_for", lambda *a, **k: _Data())
    (_, _), kw = _run(["curve", "-o", str(tmp_path / "c")])
    sig = inspect.signature(importlib.import_module("metaprune.pruning.curve").prunability_curve)
    for name, value in kw.items():
        default = sig.parameters[name].default
        if name == "device":  # the CLI resolves it first
            assert value == resolve_device(default)
        else:
            assert value == default, name
