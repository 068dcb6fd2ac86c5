import pytest
import torch

from metaprune.io import save_model
from metaprune.models import create_model


@pytest.fixture(scope="session")
def source_path(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        for mod in m.modules():  # non-trivial BN statistics so that masking errors would show
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
    return str(save_model(m, tmp_path_factory.mktemp("src") / "src.safetensors"))
