"""Reference models that are not in torchvision: ResNet-20 for CIFAR (He et al. 2016).

Used by ``studies/cifar10-resnet20.yaml`` (``--model autocompress.zoo:resnet20``) and the
CIFAR-10 benchmark: 16/32/64 channels, three stages of three basic blocks, ~0.27 M params.
Smaller members of the family, students for ``--student`` (distilled from a ResNet-20):
``resnet8`` (one block per stage, ~0.08 M params) and ``resnet20_half`` (8/16/32 channels,
~0.07 M params); their stage outputs are named as ResNet-20's (``layer1``..``layer3``), so
feature distillation pairs them stage by stage.
"""

from __future__ import annotations

import torch
from torch import nn


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # Option B shortcut (1x1 conv): keeps the graph exportable and prunable.
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(3, num_classes)


def resnet8(num_classes: int = 10) -> ResNetCifar:
    """ResNet-8: one basic block per stage (a student for ResNet-20)."""
    return ResNetCifar(1, num_classes)


def resnet20_half(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 at half width: 8/16/32 channels (a student for ResNet-20)."""
    return ResNetCifar(3, num_classes, widths=(8, 16, 32))
