"""Device resolution (torchrun / CUDA logic, checked on CPU by substituting torch.cuda) and per-rank seeds."""

from __future__ import annotations

import pytest
import torch

from metaprune.engine import runtime
from metaprune.engine.runtime import resolve_device
from metaprune.errors import ConfigError


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _torchrun(mp, local_rank: int, world: int) -> None:
    mp.setenv("LOCAL_RANK", str(local_rank))
    mp.setenv("RANK", str(local_rank))
    mp.setenv("WORLD_SIZE", str(world))
    mp.setenv("LOCAL_WORLD_SIZE", str(world))


def test_cuda_maps_to_the_local_rank_under_torchrun(four_gpus):
    _torchrun(four_gpus, 2, 4)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)


def test_cuda_without_torchrun_is_gpu_0_and_cuda_n_is_kept(four_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="not visible"):
        resolve_device("cuda:4")


def test_cuda_n_refused_with_several_processes(four_gpus):
    _torchrun(four_gpus, 1, 2)
    with pytest.raises(ConfigError, match="same GPU"):
        resolve_device("cuda:1")


def test_more_processes_than_gpus_refused(four_gpus):
    _torchrun(four_gpus, 5, 6)
    with pytest.raises(ConfigError, match="not visible"):
        resolve_device("cuda")


def test_init_distributed_sets_an_indexed_device(four_gpus):
    _torchrun(four_gpus, 3, 4)
    calls = {}
    four_gpus.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("dev", torch.device(d)))
    four_gpus.setattr(runtime.dist, "is_initialized", lambda: False)
    four_gpus.setattr(runtime.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    assert runtime.init_distributed(resolve_device("cuda"))
    assert calls == {"dev": torch.device("cuda", 3), "backend": "nccl"}
    calls.clear()
    assert runtime.init_distributed(torch.device("cuda"))  # a bare device from a library caller
    assert calls["dev"] == torch.device("cuda", 3)


@pytest.mark.parametrize("bad", ["cpu:99", "cpu:1", "meta", "cuda:x", "gpu", ""])
def test_bad_devices_refused(bad):
    with pytest.raises(ConfigError):
        resolve_device(bad)


def test_cuda_without_a_gpu_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(dev)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu:0")


def test_merge_refuses_cuda_without_a_gpu_before_reading_anything(monkeypatch, tmp_path, capsys):
    from metaprune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["merge", str(tmp_path / "no-bundle"), "--device", "cuda", "-o", str(tmp_path / "m"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "CUDA" in err, err
    assert main(["merge", str(tmp_path / "no-bundle"), "--device", "cpu:99", "-o", str(tmp_path / "m"), "-q"]) == 2
    assert "CPU device" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- augmentation seeds
def _same_images(n=16, size=28):
    from metaprune.data.datasets import TensorImageDataset

    img = torch.arange(size * size, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 1, size, size)
    return TensorImageDataset(img.repeat(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), (0.5,), (0.5,))


class _Plain(torch.utils.data.Dataset):
    """A dataset that is not in memory (takes the DataLoader path)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base.images[i], self.base.labels[i]


@pytest.mark.parametrize("wrap", [False, True], ids=["in-memory", "dataloader"])
def test_augmentation_differs_per_rank_and_is_deterministic(wrap):
    from metaprune.data import BatchLoader

    ds = _same_images()  # identical images: any difference between ranks comes from the augmentation draws
    ds = _Plain(ds) if wrap else ds

    def batch(rank, seed=0, epoch=0):
        torch.manual_seed(123)  # the global RNG must not matter
        ld = BatchLoader(ds, 8, shuffle=True, augment=True, seed=seed, rank=rank, world_size=2)
        ld.set_epoch(epoch)
        return next(iter(ld))[0]

    r0, r1 = batch(0), batch(1)
    assert not torch.equal(r0, r1)  # ranks draw different crops / flips
    assert torch.equal(r0, batch(0)) and torch.equal(r1, batch(1))  # deterministic given the seed
    assert not torch.equal(r0, batch(0, seed=1)) and not torch.equal(r0, batch(0, epoch=1))


def test_dataloader_workers_get_distinct_deterministic_seeds():
    from metaprune.data import BatchLoader

    class Seeds(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(1), torch.initial_seed() % 2**62  # the seed travels as the label (int64)

    def seeds(rank):
        ld = BatchLoader(Seeds(), 2, rank=rank, world_size=2, num_workers=2)
        return [int(y[0]) for _, y in ld]

    a = seeds(0)
    assert len(set(a)) == 2 and a == seeds(0)  # one seed per worker, the same on a rerun
    assert not set(a) & set(seeds(1))  # and different from the other rank's workers
