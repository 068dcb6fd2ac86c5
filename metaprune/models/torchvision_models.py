"""torchvision ResNets and Vision Transformers, built offline (no weight download)."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models.vision_transformer import VisionTransformer

from metaprune.models.layers import SelfAttention
from metaprune.models.registry import register_model


def _tv_resnet(fn, num_classes: int, in_chans: int) -> nn.Module:
    model = fn(weights=None, num_classes=num_classes)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    return model


@register_model("resnet18", family="resnet", image_size=224)
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """torchvision ResNet-18 (BasicBlock, ImageNet stem)."""
    return _tv_resnet(tvm.resnet18, num_classes, in_chans)


@register_model("resnet34", family="resnet", image_size=224)
def resnet34(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """torchvision ResNet-34 (BasicBlock, ImageNet stem)."""
    return _tv_resnet(tvm.resnet34, num_classes, in_chans)


@register_model("resnet50", family="resnet", image_size=224)
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """torchvision ResNet-50 (Bottleneck, ImageNet stem)."""
    return _tv_resnet(tvm.resnet50, num_classes, in_chans)


def prunable_vit(vit: VisionTransformer, in_chans: int) -> VisionTransformer:
    """Swap each encoder block's ``nn.MultiheadAttention`` for :class:`SelfAttention` (whole heads
    become prunable; state dicts keep loading) and adapt the patch embedding to ``in_chans``."""
    for block in vit.encoder.layers:
        mha = block.self_attention
        block.self_attention = SelfAttention(mha.embed_dim, mha.num_heads)
    if in_chans != 3:
        conv = vit.conv_proj
        vit.conv_proj = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride)
    return vit


@register_model("vit_b_16", family="vit", image_size=224)
def vit_b_16(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision ViT-B/16 (12 layers, 12 heads, width 768) with prunable attention heads."""
    return prunable_vit(tvm.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size), in_chans)


@register_model("vit_tiny_p4", family="vit", image_size=32)
def vit_tiny_p4(num_classes: int = 10, in_chans: int = 3, image_size: int = 32) -> nn.Module:
    """Small ViT for 28-32 px inputs: patch 4, 6 layers, 3 heads, width 192, MLP 768."""
    vit = VisionTransformer(image_size=image_size, patch_size=4, num_layers=6, num_heads=3,
                            hidden_dim=192, mlp_dim=768, num_classes=num_classes)
    return prunable_vit(vit, in_chans)
