"""``prune SRC --finetune-epochs N -o OUT`` resumes only its own finetuning (issue 12 item 1)."""

from __future__ import annotations

import pytest
import torch

from metaprune import create_model
from metaprune.data import load_dataset
from metaprune.engine import TrainConfig
from metaprune.errors import ConfigError
from metaprune.io import load_model, save_model
from metaprune.pruning import PruneConfig
from metaprune.pruning.pipeline import prune_file


def _source(path, seed):
    torch.manual_seed(seed)
    return save_model(create_model("cifar_resnet20", num_classes=4, in_chans=1), path)


def _weights(path):
    return load_model(path)[0].state_dict()


def test_rerun_with_another_source_of_the_same_widths_is_not_answered_from_the_old_run(tmp_path):
    data = load_dataset("synthetic", in_chans=1, image_size=16, num_classes=4)
    a, b = _source(tmp_path / "a.safetensors", 0), _source(tmp_path / "b.safetensors", 1)
    ft = TrainConfig(epochs=1, batch_size=32, lr=0.01, device="cpu", max_steps_per_epoch=1, augment=False)
    kw = dict(data=data, device="cpu", latency=False, eval_batches=1)
    out = tmp_path / "out"
    prune_file(a, out, PruneConfig(ratio=0.5), finetune=ft, **kw)
    a_pruned = _weights(out / "model.safetensors")
    with pytest.raises(ConfigError, match=r"start\.source_sha256.*--no-resume"):
        prune_file(b, out, PruneConfig(ratio=0.5), finetune=ft, **kw)
    assert all(torch.equal(v, _weights(out / "model.safetensors")[k]) for k, v in a_pruned.items())  # untouched
    # --no-resume: B's own finetuned model, the same as in an empty folder
    prune_file(b, out, PruneConfig(ratio=0.5), finetune=TrainConfig(**{**ft.__dict__, "resume": False}), **kw)
    prune_file(b, tmp_path / "fresh", PruneConfig(ratio=0.5), finetune=ft, **kw)
    got, fresh = _weights(out / "model.safetensors"), _weights(tmp_path / "fresh" / "model.safetensors")
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(got[k], a_pruned[k]) for k in a_pruned)
