"""CIFAR-style VGG with batch norm and a single linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from metaprune.models.registry import register_model

CFGS: dict[str, list[list[int]]] = {
    "11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(nn.Module):
    """Five blocks of 3x3 conv (with bias) + BN + ReLU, max-pooling after the first four, global
    average pooling and one linear layer. Works for 28 px and 32 px inputs."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for i, block in enumerate(cfg):
            for w in block:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            if i < len(cfg) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _make(key: str):
    def builder(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
        return CifarVGG(CFGS[key], num_classes, in_chans)

    builder.__doc__ = f"CIFAR VGG-{key} with batch norm and one linear classifier."
    return builder


for _k in CFGS:
    register_model(f"cifar_vgg{_k}_bn", family="cifar_vgg", image_size=32)(_make(_k))
