"""Datasets, derived tasks and batch loading."""

from metaprune.data.datasets import (
    DATASETS,
    DataSplits,
    TensorImageDataset,
    list_datasets,
    load_dataset,
    make_synthetic,
)
from metaprune.data.loader import BatchLoader, augment_batch
from metaprune.data.tasks import Task, get_task, list_tasks, register_task

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataSplits",
    "Task",
    "TensorImageDataset",
    "augment_batch",
    "get_task",
    "list_datasets",
    "list_tasks",
    "load_dataset",
    "make_synthetic",
    "register_task",
]
