"""Derived tasks: class subsets, regroupings and domain shifts of a base dataset.

Structured Pruning Adapter bundles are trained per task on top of one source model; these tasks
all differ from the source task and are available offline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metaprune.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataSplits,
    TensorImageDataset,
    load_fashion_mnist,
    split_train_val,
)
from metaprune.errors import UnknownNameError


@dataclass(frozen=True)
class Task:
    """A task derived from a base dataset.

    Attributes:
        name: registry name.
        description: one line for ``metaprune adapt --help`` and reports.
        label_map: new label of each base class (``None`` drops the class).
        class_names: names of the new classes.
        transform: uint8 image batch -> uint8 image batch (domain shift), or ``None``.
    """

    name: str
    description: str
    label_map: tuple[int | None, ...]
    class_names: tuple[str, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    base: str = "fashion-mnist"
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def derive(self, ds: TensorImageDataset) -> TensorImageDataset:
        """Apply the label map and the transform to a base dataset."""
        lut = torch.tensor([-1 if v is None else v for v in self.label_map])
        new = lut[ds.labels]
        keep = new >= 0
        images = ds.images[keep]
        if self.transform is not None:
            images = self.transform(images)
        return TensorImageDataset(images.contiguous(), new[keep], ds.mean, ds.std, self.class_names)

    def load(self, data_dir: str | None = None, *, val_fraction: float = 0.1, seed: int = 0,
             train_subset: int | None = None) -> DataSplits:
        train, test = load_fashion_mnist(data_dir)
        train, test = self.derive(train), self.derive(test)
        if train_subset is not None and train_subset < len(train):
            train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:train_subset])
        tr, va = split_train_val(train, val_fraction, seed)
        return DataSplits(self.name, tr, va, test, self.num_classes, 1, 28)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def list_tasks() -> list[str]:
    """Registered task names."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """A registered task; unknown names raise an error listing datasets and tasks."""
    if name not in _TASKS:
        from metaprune.data.datasets import DATASETS

        raise UnknownNameError(f"unknown dataset or task {name!r}; datasets: {', '.join(DATASETS)}; "
                               f"tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


C = FASHION_MNIST_CLASSES
register_task(Task(
    "fmnist-tops", "5-way: upper-body garments only (T-shirt, pullover, dress, coat, shirt) - the hard classes",
    (0, None, 1, 2, 3, None, 4, None, None, None), (C[0], C[2], C[3], C[4], C[6])))
register_task(Task(
    "fmnist-groups", "4-way regrouping: tops / bottoms and dresses / footwear / bags",
    (0, 1, 0, 1, 0, 2, 0, 2, 3, 2), ("tops", "bottoms+dresses", "footwear", "bags")))
register_task(Task(
    "fmnist-inverted", "10-way on a shifted domain: inverted intensities, images flipped upside down",
    tuple(range(10)), C, transform=lambda x: (255 - x).flip(-2)))
register_task(Task(
    "fmnist-footwear", "3-way footwear only (sandal, sneaker, ankle boot), 90-degree rotated",
    (None, None, None, None, None, 0, None, 1, None, 2), (C[5], C[7], C[9]),
    transform=lambda x: x.rot90(1, (-2, -1))))
