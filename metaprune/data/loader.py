"""Batch iteration with per-batch augmentation for in-memory datasets, DataLoader otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from metaprune.data.datasets import TensorImageDataset


def augment_batch(x: torch.Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, applied to a whole uint8 or float batch."""
    n, _, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
        x = xp.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        m = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(m.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def _seed_worker(worker_id: int) -> None:
    """Seed Python and NumPy in a DataLoader worker from its torch seed (base seed + worker id)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


class BatchLoader:
    """Iterate ``(x, y)`` batches of a dataset, normalised, optionally augmented and sharded.

    In-memory :class:`TensorImageDataset` batches are sliced directly (fast path); other
    datasets go through a ``DataLoader`` with ``num_workers`` and pinned memory on CUDA.

    Args:
        dataset: the dataset.
        batch_size: batch size (per process when sharded).
        shuffle: reshuffle every epoch (seeded by ``seed + epoch``, the same order on every rank so the
            shards are disjoint).
        augment: random crop (pad 4 for 32 px, 2 for 28 px) and horizontal flip, drawn from a generator
            seeded by ``(seed, rank, epoch)``: deterministic for a seed, different on every rank (and
            DataLoader workers get distinct seeds derived from it).
        rank, world_size: shard of the data this process sees (DDP).
        device: where batches are put.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 128, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 num_workers: int = 0, drop_last: bool = False, flip: bool = True):
        self.dataset, self.batch_size, self.shuffle, self.augment = dataset, batch_size, shuffle, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.num_workers, self.drop_last, self.flip = num_workers, drop_last, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def aug_seed(self) -> int:
        """Seed of this epoch's augmentation on this rank: a function of (seed, rank, epoch) only."""
        return ((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.epoch * 7919 + 17) % (2**63 - 1)

    def is_padding(self, start: int, count: int) -> torch.Tensor:
        """Which of positions ``start .. start+count-1`` of this rank's shard repeat another rank's sample.

        Sharding pads the index list so every rank gets the same number of samples (5 samples on 3
        ranks: 6 slots); position ``j`` of rank ``r`` is global slot ``r + j * world_size``, a
        duplicate when that slot is at or beyond the dataset's length.
        """
        pos = self.rank + (start + torch.arange(count)) * self.world_size
        return pos >= len(self.dataset)

    def _indices(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = -(-n // self.world_size)
            idx = torch.cat([idx, idx[: per * self.world_size - n]])  # pad so shards are equal
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        idx = self._indices()
        base = getattr(ds, "dataset", ds)
        if isinstance(ds, TensorImageDataset):
            gen = torch.Generator().manual_seed(self.aug_seed())
            pad = 4 if ds.images.shape[-1] >= 32 else 2
            for s in range(0, len(idx), self.batch_size):
                b = idx[s : s + self.batch_size]
                if self.drop_last and len(b) < self.batch_size:
                    break
                x = ds.images[b].to(self.device, non_blocking=True)
                if self.augment:
                    x = augment_batch(x, pad=pad, flip=self.flip, generator=gen)
                yield ds.normalise(x), ds.labels[b].to(self.device, non_blocking=True)
            return
        sub = torch.utils.data.Subset(ds, idx.tolist())
        gen = torch.Generator().manual_seed(self.aug_seed())
        # workers' base seed comes from `generator` (each worker adds its id): distinct per rank and worker
        dl = DataLoader(sub, batch_size=self.batch_size, num_workers=self.num_workers,
                        pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
                        generator=torch.Generator().manual_seed(self.aug_seed() + 1),
                        worker_init_fn=_seed_worker if self.num_workers else None)
        norm = getattr(base, "normalise", None)
        for x, y in dl:
            x = x.to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, pad=max(2, x.shape[-1] // 8), flip=self.flip, generator=gen)
            yield (norm(x) if norm and x.dtype == torch.uint8 else x.float()), torch.as_tensor(y).to(self.device)
