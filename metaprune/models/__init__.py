"""Architecture registry: ``create_model(name, num_classes=, in_chans=)`` and ``list_models()``.

Registered families: CIFAR ResNets (``cifar_resnet20/32/44/56/110``), CIFAR VGG-BN
(``cifar_vgg11_bn/13_bn/16_bn/19_bn``), torchvision ``resnet18/34/50``, ``vit_b_16`` and the small
``vit_tiny_p4`` for 28-32 px inputs. A new architecture is one ``@register_model`` builder.
Ecosystem models are named ``torchvision:NAME`` / ``timm:NAME`` (and trusted user code
``pkg.module:factory``); see :mod:`metaprune.models.ecosystem`.
"""

from metaprune.models import cifar_resnet, cifar_vgg, torchvision_models  # noqa: F401  (registration)
from metaprune.models.ecosystem import ModelFacts, list_external, model_facts, trusted_code
from metaprune.models.layers import SelfAttention
from metaprune.models.registry import (
    arch_spec,
    create_model,
    create_model_for_data,
    get_entry,
    list_models,
    register_model,
)
from metaprune.models.widths import apply_widths, get_widths

__all__ = [
    "ModelFacts",
    "SelfAttention",
    "apply_widths",
    "arch_spec",
    "create_model",
    "create_model_for_data",
    "get_entry",
    "get_widths",
    "list_external",
    "list_models",
    "model_facts",
    "register_model",
    "trusted_code",
]
