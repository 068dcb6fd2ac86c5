"""Datasets by name: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``, ``synthetic``.

Small datasets are held in memory as uint8 tensors (:class:`TensorImageDataset`) and batched
with augmentation applied per batch, which is several times faster on a few CPU cores than
per-image PIL transforms.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metaprune.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class TensorImageDataset(Dataset):
    """Images as a uint8 ``(N, C, H, W)`` tensor plus int64 labels, with normalisation stats."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                 std: tuple[float, ...], classes: tuple[str, ...] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 (N, C, H, W) tensor")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = mean, std
        self.classes = classes or tuple(str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.normalise(self.images[i : i + 1])[0], self.labels[i]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float batch."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def subset(self, idx: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(self.images[idx], self.labels[idx], self.mean, self.std, self.classes)


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset, and its shape."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    synthetic: bool = False

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
                f"{self.num_classes} classes, {self.in_chans}x{self.image_size}x{self.image_size}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; the file is damaged, reinstall the dataset") from None
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values); reinstall the dataset")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    return None


def load_fashion_mnist(data_dir: str | None = None) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Fashion-MNIST train and test sets from the IDX files (Debian package ``dataset-fashion-mnist``)."""
    root = Path(data_dir or os.environ.get("METAPRUNE_FASHION_MNIST", FASHION_MNIST_DIR))
    out = []
    for split in ("train", "t10k"):
        img, lab = _find(root, f"{split}-images-idx3-ubyte"), _find(root, f"{split}-labels-idx1-ubyte")
        if img is None or lab is None:
            raise DataError(
                f"Fashion-MNIST not found in {root}; install it with `apt-get install dataset-fashion-mnist` "
                "(files go to /usr/share/datasets/fashion-mnist) or pass --data-dir to a folder holding "
                "train-images-idx3-ubyte.gz and friends; `--data synthetic` runs without any data"
            )
        images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
        out.append(TensorImageDataset(images, labels, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES))
    return out[0], out[1]


def load_cifar(name: str, data_dir: str | None, download: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    """CIFAR-10/100 through torchvision (``download=True`` fetches it for users with a network)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = data_dir or os.path.expanduser("~/.cache/metaprune/data")
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if name == "cifar10" else \
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    out = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download)
        except RuntimeError:
            raise DataError(f"{name} not found in {root}; pass --download to fetch it (needs a network) "
                            f"or --data-dir to a folder that holds it") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(TensorImageDataset(images, torch.tensor(ds.targets), mean, std, tuple(ds.classes)))
    return out[0], out[1]


def make_synthetic(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, n_train: int = 512,
                   n_test: int = 256, seed: int = 0) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Tiny deterministic dataset whose classes are learnable (each class has its own mean pattern)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, in_chans, image_size, image_size, generator=g)

    def make(n: int) -> TensorImageDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        x = 0.6 * protos[labels] + 0.4 * torch.rand(n, in_chans, image_size, image_size, generator=g)
        return TensorImageDataset((x * 255).round().to(torch.uint8), labels,
                                  (0.5,) * in_chans, (0.25,) * in_chans)

    return make(n_train), make(n_test)


class ImageFolderTensor(Dataset):
    """torchvision ImageFolder with resize + tensor conversion (images decoded on access)."""

    def __init__(self, root: str, image_size: int, in_chans: int):
        from torchvision import datasets, transforms

        tf = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if in_chans == 1:
            tf.append(transforms.Grayscale())
        tf.append(transforms.PILToTensor())
        try:
            self.ds = datasets.ImageFolder(root, transform=transforms.Compose(tf))
        except (FileNotFoundError, RuntimeError, OSError) as e:
            raise DataError(f"{root}: {e}; an image folder needs one sub-folder of images per class") from None
        self.classes = tuple(self.ds.classes)
        self.mean, self.std = (0.485, 0.456, 0.406)[:in_chans] or (0.5,), (0.229, 0.224, 0.225)[:in_chans]
        if in_chans == 1:
            self.mean, self.std = (0.5,), (0.25,)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            x, y = self.ds[i]
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
            path = self.ds.samples[i][0]
            raise DataError(f"cannot read image {path} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                            "the file is damaged or not an image: remove or replace it") from None
        return x, y

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


def load_imagefolder(path: str, image_size: int, in_chans: int) -> tuple[Dataset, Dataset]:
    """An ImageFolder tree: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (or ``val``)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {root}/train/<class>/*.png and {root}/test/...")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root} must hold train/ and test/ (or val/) folders with one sub-folder per class")
    train = ImageFolderTensor(str(root / "train"), image_size, in_chans)
    test = ImageFolderTensor(str(test_dir), image_size, in_chans)
    if len(train.classes) < 2:
        raise DataError(f"{root / 'train'} holds {len(train.classes)} class folder(s) ({', '.join(train.classes)}); "
                        "a classification task needs at least 2 (one sub-folder of images per class)")
    for d in (root / "test", root / "val"):
        if not d.is_dir():
            continue
        classes = test.classes if d == test_dir else tuple(sorted(e.name for e in os.scandir(d) if e.is_dir()))
        if classes != train.classes:
            only_train = sorted(set(train.classes) - set(classes))
            only_d = sorted(set(classes) - set(train.classes))
            raise DataError(f"{d} has other classes than {root / 'train'} (only in train: {only_train or '-'}, "
                            f"only in {d.name}: {only_d or '-'}); both need the same class folders")
    return train, test


DATASETS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST, 10 classes, 1x28x28 (Debian package dataset-fashion-mnist)",
    "cifar10": "CIFAR-10, 10 classes, 3x32x32 (torchvision; --download)",
    "cifar100": "CIFAR-100, 100 classes, 3x32x32 (torchvision; --download)",
    "imagefolder:PATH": "your own images: PATH/train/<class>/*, PATH/test/<class>/*",
    "synthetic": "tiny deterministic data shaped to the model (for tests and trying things out)",
}


def list_datasets() -> list[str]:
    """Dataset names accepted by :func:`load_dataset` (plus task names from :mod:`metaprune.data.tasks`)."""
    from metaprune.data.tasks import list_tasks

    return list(DATASETS) + list_tasks()


def split_train_val(train: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Carve a validation split out of the training data, stratification-free and seeded."""
    n = len(train)
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_fraction {val_fraction} leaves no training or no validation data ({n} samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:], perm[:n_val]
    if isinstance(train, TensorImageDataset):
        return train.subset(tr), train.subset(va)
    return torch.utils.data.Subset(train, tr.tolist()), torch.utils.data.Subset(train, va.tolist())


def load_dataset(name: str, data_dir: str | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = False, in_chans: int | None = None, image_size: int | None = None,
                 num_classes: int | None = None, train_subset: int | None = None) -> DataSplits:
    """Load dataset ``name`` as train / val / test splits.

    Args:
        name: a name from :data:`DATASETS`, ``imagefolder:PATH`` or a task name.
        data_dir: where the files are (defaults per dataset).
        val_fraction: fraction of the training data held out for model selection.
        seed: seed of the train/val split.
        download: allow torchvision to download CIFAR.
        in_chans, image_size, num_classes: shape of ``synthetic`` data (to fit the model at hand);
            ``in_chans`` and ``image_size`` also set how ``imagefolder`` images are decoded.
        train_subset: keep only this many (seeded, random) training images, for short runs.
    """
    synthetic = False
    if name == "fashion-mnist":
        train, test = load_fashion_mnist(data_dir)
        nc, ch, size = 10, 1, 28
    elif name in ("cifar10", "cifar100"):
        train, test = load_cifar(name, data_dir, download)
        nc, ch, size = (10 if name == "cifar10" else 100), 3, 32
    elif name == "synthetic":
        nc, ch, size = num_classes or 10, in_chans or 3, image_size or 32
        train, test = make_synthetic(nc, ch, size, seed=seed)
        synthetic = True
    elif name.startswith("imagefolder:"):
        ch, size = in_chans or 3, image_size or 32
        train, test = load_imagefolder(name.split(":", 1)[1], size, ch)
        nc = len(train.classes)
    else:
        from metaprune.data.tasks import get_task

        return get_task(name).load(data_dir, val_fraction=val_fraction, seed=seed, train_subset=train_subset)
    if train_subset is not None and isinstance(train, TensorImageDataset) and train_subset < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:train_subset]
        train = train.subset(idx)
    tr, va = split_train_val(train, val_fraction, seed)
    return DataSplits(name, tr, va, test, nc, ch, size, synthetic)


def repeat_channels(data: DataSplits, in_chans: int) -> DataSplits:
    """``data`` (1-channel images held in memory, e.g. Fashion-MNIST) with each image's channel
    repeated ``in_chans`` times, for a model that takes colour images (the usual grey -> RGB);
    normalisation statistics repeated alike. Other data is refused with a :class:`DataError`."""
    splits = (data.train, data.val, data.test)
    if data.in_chans != 1 or not all(isinstance(s, TensorImageDataset) for s in splits):
        raise DataError(f"{data.name} has {data.in_chans}-channel images that cannot be repeated to {in_chans} "
                        "channels; use data with the model's number of channels")

    def rep(ds: TensorImageDataset) -> TensorImageDataset:
        return TensorImageDataset(ds.images.expand(-1, in_chans, -1, -1), ds.labels, ds.mean * in_chans,
                                  ds.std * in_chans, ds.classes)

    return DataSplits(data.name, rep(data.train), rep(data.val), rep(data.test), data.num_classes, in_chans,
                      data.image_size, data.synthetic)
