import pytest
import torch

from metaprune.data import BatchLoader, augment_batch, get_task, list_tasks, load_dataset
from metaprune.errors import DataError, UnknownNameError


def test_synthetic_is_deterministic_and_shaped():
    a = load_dataset("synthetic", in_chans=1, image_size=28, num_classes=4, seed=3)
    b = load_dataset("synthetic", in_chans=1, image_size=28, num_classes=4, seed=3)
    assert (a.in_chans, a.image_size, a.num_classes) == (1, 28, 4)
    assert torch.equal(a.train.images, b.train.images) and a.synthetic


def test_val_split_is_disjoint_from_train():
    d = load_dataset("synthetic", val_fraction=0.2)
    assert len(d.val) == round(512 * 0.2) and len(d.train) + len(d.val) == 512
    rows = {bytes(x.numpy()) for x in d.train.images}
    assert not any(bytes(x.numpy()) in rows for x in d.val.images)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_unknown_dataset_lists_valid():
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        load_dataset("mnist-but-wrong")


def test_loader_batches_and_sharding():
    d = load_dataset("synthetic", in_chans=1, image_size=28)
    full = sum(len(y) for _, y in BatchLoader(d.train, 64))
    shards = [sum(len(y) for _, y in BatchLoader(d.train, 64, shuffle=True, rank=r, world_size=2)) for r in (0, 1)]
    assert full == len(d.train) and shards[0] == shards[1] >= full / 2
    x, _ = next(iter(BatchLoader(d.train, 8, augment=True)))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28)


def test_augment_keeps_shape_and_content_statistics():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    y = augment_batch(x, pad=0, flip=False)
    assert torch.equal(x, y)
    z = augment_batch(x, pad=2, generator=torch.Generator().manual_seed(0))
    assert z.shape == x.shape


@pytest.mark.data
def test_real_fashion_mnist_and_tasks():
    d = load_dataset("fashion-mnist")
    assert (len(d.train) + len(d.val), len(d.test), d.num_classes) == (60000, 10000, 10)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 28, 28)
    assert len(list_tasks()) >= 3
    tops = load_dataset("fmnist-tops")
    assert tops.num_classes == 5 and len(tops.test) == 5000
    assert int(tops.test.labels.max()) == 4
    assert get_task("fmnist-groups").num_classes == 4


def _folder(root, layout: dict[str, dict[str, int]]):
    """An image folder: {split: {class: number of 8x8 grey PNGs}}."""
    from PIL import Image

    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), color=40 * i).save(root / split / c / f"{i}.png")
    return f"imagefolder:{root}"


def test_imagefolder_with_one_class_is_refused(tmp_path):
    name = _folder(tmp_path, {"train": {"a": 4}, "test": {"a": 2}})
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(name, in_chans=1, image_size=8)


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_imagefolder_split_classes_must_match(tmp_path, held_out):
    layout = {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}}
    layout[held_out] = {"a": 2, "c": 2}
    with pytest.raises(DataError, match=r"only in train: \['b'\].*only in " + held_out + r": \['c'\]"):
        load_dataset(_folder(tmp_path, layout), in_chans=1, image_size=8)


def test_imagefolder_corrupt_image_is_one_clear_error(tmp_path):
    name = _folder(tmp_path, {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    d = load_dataset(name, in_chans=1, image_size=8, val_fraction=0.25)
    assert len(d.train) + len(d.val) == 8 and d.num_classes == 2
    with pytest.raises(DataError, match=r"cannot read image .*1\.png"):
        for i in range(len(d.train.dataset)):
            d.train.dataset[i]
