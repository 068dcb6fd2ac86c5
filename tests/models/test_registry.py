import pytest
import torch

from metaprune import create_model, list_models
from metaprune.errors import ConfigError, UnknownNameError
from metaprune.models import apply_widths, get_widths

REQUIRED = [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)] + [f"cifar_vgg{d}_bn" for d in (11, 13, 16, 19)] + [
    "resnet18", "resnet34", "resnet50", "vit_b_16", "vit_tiny_p4"]


def test_registry_lists_required_architectures():
    assert set(REQUIRED) <= set(list_models())
    assert list_models("cifar_vgg*") == sorted(n for n in REQUIRED if n.startswith("cifar_vgg"))


@pytest.mark.parametrize("name,size", [("cifar_resnet20", 28), ("cifar_resnet56", 32), ("cifar_vgg11_bn", 28),
                                       ("cifar_vgg19_bn", 32), ("resnet18", 64), ("vit_tiny_p4", 28)])
def test_builders_take_classes_and_channels(name, size):
    kw = {"image_size": size} if name.startswith("vit") else {}
    m = create_model(name, num_classes=7, in_chans=1, **kw).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    assert m.metaprune_arch == {"arch": name, "args": {"num_classes": 7, "in_chans": 1, **kw}}


def test_cifar_resnet56_matches_the_papers_size():
    m = create_model("cifar_resnet56")
    assert sum(p.numel() for p in m.parameters()) == 855_770  # 0.86 M (option-B shortcuts, 10 classes)
    assert m.layer2[0].downsample is not None and m.layer1[0].downsample is None


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="cifar_resnet20"):
        create_model("resnet9000")


def test_bad_builder_argument():
    with pytest.raises(ConfigError, match="does not take"):
        create_model("cifar_resnet20", depth=3)


def test_widths_round_trip_resizes_a_pruned_model():
    m = create_model("cifar_resnet20", in_chans=1)
    m.layer1[0].conv1 = torch.nn.Conv2d(16, 5, 3, 1, 1, bias=False)
    m.layer1[0].bn1 = torch.nn.BatchNorm2d(5)
    m.layer1[0].conv2 = torch.nn.Conv2d(5, 16, 3, 1, 1, bias=False)
    fresh = create_model("cifar_resnet20", in_chans=1)
    apply_widths(fresh, get_widths(m), m.state_dict())
    fresh.load_state_dict(m.state_dict())
    assert fresh.layer1[0].conv1.out_channels == 5 and fresh.layer1[0].bn1.num_features == 5
