"""Accuracy and loss of a model on a dataset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from metaprune.data.loader import BatchLoader
from metaprune.engine.runtime import all_reduce_sum, get_rank, get_world_size, progress
from metaprune.errors import ConfigError


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu",
             amp: bool = False, desc: str = "eval", max_batches: int | None = None,
             sharded: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``.

    With ``sharded`` (DDP), each process evaluates its shard and the counts are summed; the samples
    that pad the shards to equal length are left out, so every sample counts exactly once.
    ``max_batches`` (>= 1) limits the batches per process; ``None`` evaluates everything.
    """
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches / --eval-batches {max_batches} must be >= 1 (leave it out to evaluate "
                          "the whole split)")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    rank, world = (get_rank(), get_world_size()) if sharded else (0, 1)
    loader = BatchLoader(dataset, batch_size, device=device, rank=rank, world_size=world,
                         num_workers=4 if device.type == "cuda" else 0)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    seen = 0
    for i, (x, y) in enumerate(progress(loader, desc)):
        if max_batches is not None and i >= max_batches:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(x)
        keep = ~loader.is_padding(seen, len(y)).to(y.device) if world > 1 else torch.ones_like(y, dtype=torch.bool)
        seen += len(y)
        stats[0] += ((out.argmax(1) == y) & keep).sum()
        stats[1] += (F.cross_entropy(out.float(), y, reduction="none") * keep).sum()
        stats[2] += keep.sum()
    if sharded:
        all_reduce_sum(stats)
    model.train(was_training)
    n = max(1.0, stats[2].item())
    return {"acc": 100.0 * stats[0].item() / n, "loss": stats[1].item() / n, "n": int(stats[2].item())}
