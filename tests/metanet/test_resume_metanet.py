"""Meta-training and zoo resume belong to one run (issue 12 item 1), bad numbers and non-finite values
are refused (items 11, 12), an interrupted meta-training resumes to the uninterrupted result."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from metaprune.cli import main
from metaprune.data import load_dataset
from metaprune.engine import TrainConfig
from metaprune.errors import ConfigError, MetapruneError, ModelFileError, TrainingError
from metaprune.metanet.checkpoint import load_metanet, save_metanet
from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
from metaprune.metanet.zoo import ZooConfig, build_zoo, load_member

mt = importlib.import_module("metaprune.metanet.meta_train")  # the module (the package exports the function)
NET = dict(hidden=8, layers=1, edit="scale", rho=1.0)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)


def _zoo_cfg(**kw):
    train = TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1, augment=False)
    return ZooConfig(**{**dict(arch="cifar_resnet20", data="synthetic", count=3, train_subset=None, train=train), **kw})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(_zoo_cfg(), data, root)
    return root


def _cfg(**kw):
    base = dict(epochs=2, steps_per_member=2, batch_size=16, val_members=1, score_steps=1, score_batches=1,
                device="cpu", lam=0.5, prune_aware=1.0)
    return MetaTrainConfig(**{**base, **kw})


def _net_weights(folder):
    return load_metanet(folder)[0].state_dict()


def test_interrupted_meta_training_resumes_to_the_uninterrupted_result(zoo, data, tmp_path, monkeypatch):
    full = mt.meta_train(zoo, data, tmp_path / "full", _cfg(), MetanetConfig(**NET))
    real = mt.progress

    def killed_in_epoch_2(it, desc="", **kw):
        if desc.startswith("meta-train 2/"):
            raise KeyboardInterrupt("simulated kill")
        return real(it, desc, **kw)

    monkeypatch.setattr(mt, "progress", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        mt.meta_train(zoo, data, tmp_path / "cut", _cfg(), MetanetConfig(**NET))
    monkeypatch.setattr(mt, "progress", real)
    names = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert names == ["config.json", "last.pt", "log.jsonl", "metanet.safetensors"]  # no partial (.tmp) files
    resumed = mt.meta_train(zoo, data, tmp_path / "cut", _cfg(), MetanetConfig(**NET))
    assert resumed["selected_epoch"] == full["selected_epoch"] and resumed["val_score"] == full["val_score"]
    a, b = _net_weights(tmp_path / "full"), _net_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["net"]
    lb = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["net"]
    assert all(torch.equal(la[k], lb[k]) for k in la)
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_meta_training_of_another_run_is_refused(zoo, data, tmp_path):
    out = tmp_path / "mn"
    mt.meta_train(zoo, data, out, _cfg(epochs=1), MetanetConfig(**NET))
    with pytest.raises(ConfigError, match=r"config\.lr: 0\.001 -> 0\.002.*--no-resume"):
        mt.meta_train(zoo, data, out, _cfg(epochs=1, lr=2e-3), MetanetConfig(**NET))
    with pytest.raises(ConfigError, match=r"metanet\.hidden: 8 -> 16"):
        mt.meta_train(zoo, data, out, _cfg(epochs=1), MetanetConfig(**{**NET, "hidden": 16}))
    # a zoo whose member weights differ (same names, same architecture) is another run too
    other = tmp_path / "zoo2"
    build_zoo(_zoo_cfg(seed=7), data, other)
    with pytest.raises(ConfigError, match=r"zoo\."):
        mt.meta_train(other, data, out, _cfg(epochs=1), MetanetConfig(**NET))
    before = _net_weights(out)
    s = mt.meta_train(other, data, out, _cfg(epochs=1), MetanetConfig(**NET), resume=False)  # --no-resume
    assert s["selected_epoch"] == 0
    assert not all(torch.equal(v, _net_weights(out)[k]) for k, v in before.items())
    # more epochs of the same run continue it (constant learning rate: the same as running longer)
    s = mt.meta_train(other, data, out, _cfg(epochs=2), MetanetConfig(**NET))
    assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [0, 1]


def test_zoo_reuse_needs_the_same_settings(zoo, data):
    with pytest.raises(ConfigError, match=r"train\.lr"):
        build_zoo(_zoo_cfg(train=TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1,
                                             augment=False, lr=0.05)), data, zoo)
    with pytest.raises(ConfigError, match=r"seed"):
        build_zoo(_zoo_cfg(seed=3), data, zoo)
    assert len(build_zoo(_zoo_cfg(count=2), data, zoo)) == 2  # fewer (or more) members: the same zoo
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        build_zoo(_zoo_cfg(train=TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1,
                                             augment=False, optimizer="adamw")), data, zoo)
    index = zoo / "zoo.json"  # a zoo made before --optimizer existed (no such key) is an SGD zoo: reused
    old = json.loads(index.read_text())
    old["config"]["train"].pop("optimizer")
    index.write_text(json.dumps(old))
    assert len(build_zoo(_zoo_cfg(count=2), data, zoo)) == 2


def test_interrupted_zoo_resumes_to_the_uninterrupted_zoo(data, tmp_path, monkeypatch):
    zoo_mod = importlib.import_module("metaprune.metanet.zoo")
    cfg = _zoo_cfg(count=2, train=TrainConfig(epochs=2, batch_size=32, device="cpu", max_steps_per_epoch=1,
                                              augment=False))
    build_zoo(cfg, data, tmp_path / "full")
    real = zoo_mod.train

    class Kill:  # kills member 1 after its first epoch's checkpoint
        def on_epoch_start(self, model, epoch):
            if epoch == 1:
                raise KeyboardInterrupt("simulated kill")

        def after_backward(self, model):
            pass

    def crashing(model, data, cfg, out_dir=None, **kw):
        return real(model, data, cfg, out_dir=out_dir,
                    regularizer=Kill() if str(out_dir).endswith("member_001") else None, **kw)

    monkeypatch.setattr(zoo_mod, "train", crashing)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(cfg, data, tmp_path / "cut")
    monkeypatch.setattr(zoo_mod, "train", real)
    m1 = tmp_path / "cut" / "member_001"
    assert sorted(p.name for p in m1.iterdir()) == ["last.pt"]  # nothing partial
    mtime = (tmp_path / "cut" / "member_000" / "model.safetensors").stat().st_mtime_ns
    build_zoo(cfg, data, tmp_path / "cut")
    assert (tmp_path / "cut" / "member_000" / "model.safetensors").stat().st_mtime_ns == mtime  # skipped
    for i in (0, 1):
        a = load_member(tmp_path / "full" / f"member_00{i}")[0].state_dict()
        b = load_member(tmp_path / "cut" / f"member_00{i}")[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (m1 / "last.pt").exists()


@pytest.mark.parametrize("field, value", [("epochs", 0), ("epochs", -1), ("batch_size", 0), ("lr", math.nan),
                                          ("lr", math.inf), ("weight_decay", math.nan), ("lam", math.inf),
                                          ("alpha", math.nan), ("prune_aware", math.nan),
                                          ("score_max_speedup", math.inf), ("steps_per_member", 1.5)])
def test_meta_train_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        MetaTrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("rho", math.nan), ("rho", math.inf), ("hidden", 0), ("edge_chunk", 0)])
def test_metanet_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        MetanetConfig(**{field: value})


def test_a_diverging_meta_training_stops_and_writes_no_metanetwork(zoo, data, tmp_path):
    net_cfg = MetanetConfig(hidden=8, layers=1, edit="residual")
    with pytest.raises(TrainingError, match="NaN|nan|inf"):
        mt.meta_train(zoo, data, tmp_path / "mn", _cfg(lr=1e30, steps_per_member=3, prune_aware=0.0), net_cfg)
    assert not (tmp_path / "mn" / "metanet.safetensors").exists()


def _metanet_for(zoo, **kw):
    from metaprune.graph import to_graph
    from metaprune.metanet.model import Metanet

    model, _ = load_member(zoo / "member_000")
    torch.manual_seed(0)
    return Metanet.for_graph(to_graph(model), MetanetConfig(**{**NET, **kw})), model


def test_a_metanetwork_with_non_finite_weights_is_refused(zoo, tmp_path, capsys):
    net, _ = _metanet_for(zoo)
    save_metanet(net, tmp_path / "ok")
    with torch.no_grad():
        next(iter(net.parameters()))[0].fill_(math.nan)
    with pytest.raises(ModelFileError, match="NaN"):
        save_metanet(net, tmp_path / "nan")
    # a file edited to NaN afterwards: refused when it is loaded, by `transform` too, nothing written
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "ok" / "metanet.safetensors")
    sd[next(iter(sd))].fill_(math.nan)
    save_file(sd, tmp_path / "ok" / "metanet.safetensors")
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load_metanet(tmp_path / "ok")
    out = tmp_path / "edited.safetensors"
    rc = main(["transform", str(zoo / "member_000" / "model.safetensors"), "--metanet", str(tmp_path / "ok"),
               "-o", str(out), "--calib-batches", "0", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "NaN" in err and not out.exists()


def test_transform_refuses_an_edit_that_is_not_finite(zoo):
    from metaprune.metanet.transform import transform_model

    net, model = _metanet_for(zoo, edit="residual", rho=0.05)
    with torch.no_grad():  # finite weights whose edit overflows: every decoder output ~1e38
        for name, p in net.named_parameters():
            if "dec" in name:
                p.fill_(3e38)
    with pytest.raises(ModelFileError, match="NaN or infinite.*nothing was written"):
        transform_model(net, model)


def test_cli_meta_train_epochs_0_and_bad_numbers_write_nothing(zoo, tmp_path, capsys):
    for bad in (["--epochs", "0"], ["--lr", "nan"], ["--batch-size", "0"], ["--weight-decay", "inf"]):
        out = tmp_path / "mn"
        rc = main(["meta-train", "--zoo", str(zoo), "-o", str(out), *bad, "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err, (bad, err)
        assert not out.exists()
    for bad in (["--calib-batches", "-1"], ["--finetune-epochs", "-2"], ["--lr", "nan"], ["--batch-size", "0"]):
        out = tmp_path / "t.safetensors"
        rc = main(["transform", str(zoo / "member_000" / "model.safetensors"), "--metanet", str(tmp_path), "-o",
                   str(out), *bad, "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and not out.exists(), (bad, err)
    for bad in (["--count", "0"], ["--epochs", "0"], ["--finetune-epochs", "-1"], ["--lr", "inf"]):
        out = tmp_path / "z"
        rc = main(["zoo", "--data", "synthetic", "-o", str(out), *bad, "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("error:") == 1 and not out.exists(), (bad, err)
    assert isinstance(ConfigError("x"), MetapruneError)


def test_vit_zoo_builds_at_the_data_s_image_size_with_adamw(data, tmp_path):
    """A zoo builds its members for the data's images (a ViT's position embeddings: 16 px here, the builder's
    default is 32) and trains them with the configured optimizer."""
    train = TrainConfig(epochs=1, batch_size=32, device="cpu", max_steps_per_epoch=1, augment=False,
                        optimizer="adamw", lr=1e-3)
    res = build_zoo(_zoo_cfg(arch="vit_tiny_p4", count=1, train=train), data, tmp_path)
    model, _ = load_member(tmp_path / "member_000")
    assert model.metaprune_arch["args"]["image_size"] == 16 and res[0]["arch"] == "vit_tiny_p4"
    assert json.loads((tmp_path / "zoo.json").read_text())["config"]["train"]["optimizer"] == "adamw"


def test_zoo_with_initial_pruning(data, tmp_path):
    """--init-speedup prunes every member to that MAC speed-up (then a short finetune) before it is stored."""
    res = build_zoo(_zoo_cfg(count=1, init_speedup=2.0, finetune_epochs=1), data, tmp_path / "z")
    assert res[0]["speedup"] == pytest.approx(2.0, rel=0.05)
    model, metrics = load_member(tmp_path / "z" / "member_000")
    from metaprune.models import create_model

    full = sum(p.numel() for p in create_model("cifar_resnet20", num_classes=4, in_chans=1).parameters())
    assert sum(p.numel() for p in model.parameters()) == metrics["params"] < 0.7 * full
