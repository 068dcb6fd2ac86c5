"""Resume checkpoints belong to one run (issue 12 item 1); non-finite runs stop (item 12)."""

from __future__ import annotations

import math

import pytest
import torch

from metaprune import create_model
from metaprune.data import load_dataset
from metaprune.engine import TrainConfig, train
from metaprune.errors import ConfigError, TrainingError


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model("cifar_resnet20", num_classes=4, in_chans=1)


def _cfg(**kw):
    base = dict(epochs=1, batch_size=32, lr=0.05, device="cpu", max_steps_per_epoch=2, augment=False)
    return TrainConfig(**{**base, **kw})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_another_models_checkpoint(data, tmp_path):
    """Model B trained into a folder holding model A's last.pt must not come back as A."""
    a = train(_model(0), data, _cfg(), out_dir=tmp_path).model
    b0 = _model(1)
    with pytest.raises(ConfigError, match=r"different .*start\.weights_sha256.*--no-resume"):
        train(b0, data, _cfg(), out_dir=tmp_path)
    # --no-resume: B is trained afresh (and equals B trained in an empty folder), A's checkpoint is replaced
    b = train(_model(1), data, _cfg(resume=False), out_dir=tmp_path).model
    fresh = train(_model(1), data, _cfg(), out_dir=tmp_path / "fresh").model
    assert _same(b, fresh) and not _same(b, a)
    again = train(_model(1), data, _cfg(), out_dir=tmp_path).model  # now the checkpoint is B's: resumed
    assert _same(again, b)


@pytest.mark.parametrize("change, named", [({"lr": 0.02}, "config.lr"), ({"epochs": 2}, "config.epochs"),
                                           ({"seed": 3}, "config.seed"), ({"optimizer": "adamw"}, "config.optimizer")])
def test_resume_refuses_a_changed_config(data, tmp_path, change, named):
    train(_model(0), data, _cfg(), out_dir=tmp_path)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        train(_model(0), data, _cfg(**change), out_dir=tmp_path)


def test_resume_refuses_other_architecture_and_data(data, tmp_path):
    train(_model(0), data, _cfg(), out_dir=tmp_path)
    other = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4, seed=5)
    with pytest.raises(ConfigError, match=r"data\.samples"):
        train(_model(0), other, _cfg(), out_dir=tmp_path)
    torch.manual_seed(0)
    deeper = create_model("cifar_resnet32", num_classes=4, in_chans=1)
    with pytest.raises(ConfigError, match=r"model\.arch: cifar_resnet20 -> cifar_resnet32"):
        train(deeper, data, _cfg(), out_dir=tmp_path)


def test_checkpoint_without_fingerprint_is_refused(data, tmp_path):
    train(_model(0), data, _cfg(), out_dir=tmp_path)
    st = torch.load(tmp_path / "last.pt", weights_only=True)
    del st["fingerprint"]
    torch.save(st, tmp_path / "last.pt")
    with pytest.raises(Exception, match="without a run fingerprint.*--no-resume"):
        train(_model(0), data, _cfg(), out_dir=tmp_path)


class _Crash:
    """A regularizer that kills the run at the start of epoch ``at`` (after epoch ``at - 1``'s checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_start(self, model, epoch):
        if epoch == self.at:
            raise KeyboardInterrupt("simulated kill")

    def after_backward(self, model):
        pass


def test_interrupted_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    cfg = _cfg(epochs=3, augment=True)  # augmentation and schedule must continue exactly
    full = train(_model(0), data, cfg, out_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(_model(0), data, cfg, out_dir=tmp_path / "cut", regularizer=_Crash(at=2))
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["last.pt"]  # no partial files
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train(_model(0), data, cfg, out_dir=tmp_path / "cut")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch and _same(resumed.model, full.model)
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    last_cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last_full[k], last_cut[k]) for k in last_full)


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", math.inf), ("weight_decay", math.nan),
                                          ("momentum", math.inf), ("label_smoothing", math.nan),
                                          ("warmup_epochs", math.inf), ("sparse_reg", math.nan),
                                          ("epochs", -1), ("batch_size", 0), ("max_steps_per_epoch", 0),
                                          ("lr", "0.1"), ("epochs", 2.5), ("augment", "no"),
                                          ("optimizer", "adam"), ("optimizer", 1)])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_a_loss_that_becomes_non_finite_stops_the_run(data, tmp_path):
    with pytest.raises(TrainingError, match="NaN|nan|inf"):
        train(_model(0), data, _cfg(lr=1e30, max_steps_per_epoch=4, schedule="constant"), out_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()
