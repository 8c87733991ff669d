"""A student for the digits demo teacher (tests/test_student.py): a smaller CNN whose
stage outputs sit at the teacher's resolutions (8x8 and 4x4), so feature KD pairs them."""

from __future__ import annotations

import torch
from torch import nn


def tiny_student(num_classes: int = 10) -> nn.Module:
    """conv 8 -> stage1 (8x8, 8 ch) -> stage2 (4x4, 16 ch) -> pool -> fc."""
    return _Tiny(num_classes)


class _Tiny(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stage2(self.stage1(x))
        return self.fc(self.flatten(self.pool(x)))
