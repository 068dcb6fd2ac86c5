import sys
from pathlib import Path

# pytest puts tests/ on sys.path (rootdir conftest, no __init__.py), where tests/spa/ would shadow the
# real `spa` package as a namespace package; import the real one first.
_ROOT = str(Path(__file__).resolve().parents[2])
if getattr(sys.modules.get("spa"), "__file__", None) is None:
    sys.modules.pop("spa", None)
    sys.path.insert(0, _ROOT)
    import spa  # noqa: F401,E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metaprune.io import save_model  # noqa: E402
from metaprune.models import create_model  # noqa: E402


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
