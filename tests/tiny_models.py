"""Small architectures shared by several test modules (built fresh on every call)."""

from __future__ import annotations

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """A 2-layer ViT on 32x32 inputs: attention, MLP blocks and a patch-embedding conv."""
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=num_classes)
