"""Accuracy and loss of a model on a dataset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from metaprune.data.loader import BatchLoader
from metaprune.engine.runtime import all_reduce_sum, get_rank, get_world_size, progress


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu",
             amp: bool = False, desc: str = "eval", max_batches: int | None = None,
             sharded: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``.

    With ``sharded`` (DDP), each process evaluates its shard and the counts are summed.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    rank, world = (get_rank(), get_world_size()) if sharded else (0, 1)
    loader = BatchLoader(dataset, batch_size, device=device, rank=rank, world_size=world,
                         num_workers=4 if device.type == "cuda" else 0)
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(progress(loader, desc)):
        if max_batches is not None and i >= max_batches:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(x)
        stats[0] += (out.argmax(1) == y).sum()
        stats[1] += F.cross_entropy(out.float(), y, reduction="sum")
        stats[2] += len(y)
    if sharded:
        all_reduce_sum(stats)
    model.train(was_training)
    n = max(1.0, stats[2].item())
    return {"acc": 100.0 * stats[0].item() / n, "loss": stats[1].item() / n, "n": int(stats[2].item())}
