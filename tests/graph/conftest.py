"""Graph tests run single-threaded: on a shared 2-core machine OpenMP barriers between two
intra-op threads made a CIFAR ResNet-56 forward 150x slower (5.5 s instead of 0.04 s)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
