"""CIFAR-style ResNets (depth 6n+2, widths 16/32/64, 1x1-conv+BN downsampling shortcuts).

Module names follow the common CIFAR ResNet code (``conv1, bn1, layer1..3, fc``; blocks with
``conv1, bn1, conv2, bn2, downsample``), so state dicts from other projects load by key.
"""

from __future__ import annotations

import torch
from torch import nn

from metaprune.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers and a shortcut (identity, or 1x1 conv + BN when the shape changes)."""

    def __init__(self, in_planes: int, mid_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem, three stages of ``n`` basic blocks, global pooling, one linear layer."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, w, w, stride))
                in_planes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make(depth: int):
    def builder(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, in_chans)

    builder.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage, widths 16/32/64)."
    return builder


for _d in (20, 32, 44, 56, 110):
    register_model(f"cifar_resnet{_d}", family="cifar_resnet", image_size=32)(_make(_d))
