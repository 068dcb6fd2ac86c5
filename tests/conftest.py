"""Shared fixtures: tiny models, synthetic data, no progress bars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("METAPRUNE_NO_PROGRESS", "1")
torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription on shared cores

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_data = pytest.mark.skip(reason="Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "data" in item.keywords and not FMNIST.exists():
            item.add_marker(skip_data)


@pytest.fixture
def synthetic_data():
    """A tiny learnable 1x28x28 synthetic dataset with 10 classes."""
    from metaprune.data import load_dataset

    return load_dataset("synthetic", in_chans=1, image_size=28, num_classes=10)


@pytest.fixture
def tiny_resnet():
    """An untrained cifar_resnet20 for 1-channel inputs."""
    from metaprune import create_model

    torch.manual_seed(0)
    return create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
