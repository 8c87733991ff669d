"""The built-in demo: a small residual CNN for 1x8x8 digits, trained on first use.

Small enough to train in seconds on a CPU, but shaped like the models users bring, so
the search meets the hard cases on a fresh machine: two residual blocks whose identity
adds couple channels across layers (torch-pruning must prune them together), a strided
conv that changes width, BatchNorm to fold, and a Linear head.

Shapes (batch N): 1x8x8 -> stem 32x8x8 -> block1 32x8x8 -> down 64x4x4 -> block2 64x4x4
-> global average pool 64 -> fc 10 logits. About 111k parameters.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from autocompress.intake.data import DataSplits

# Bump when the training recipe changes: it is part of the cache key, so stale weights
# trained by an older recipe are never reused.
_RECIPE = "adam-onecycle-lr3e-3-wd1e-4-bs128-ep8-v1"
DEMO_EPOCHS = 8  # 98.9-99.7% val over seeds 0-3 (15 epochs bought nothing)
DEMO_BATCH_SIZE = 128  # half the steps of 64 for the same accuracy: ~6 s CPU
DEMO_LR = 3e-3


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU (a ResNet basic block, no downsample)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # The identity add ties conv2's output channels to the block input's channels.
        return self.relu2(out + x)


class DemoNet(nn.Module):
    """Stem conv, residual block, strided conv, residual block, pool, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.block1 = ResidualBlock(32)
        self.down_conv = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(64)
        self.down_relu = nn.ReLU()
        self.block2 = ResidualBlock(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (N, 32, H, W)
        x = self.block1(x)
        x = self.down_relu(self.down_bn(self.down_conv(x)))  # (N, 64, H/2, W/2)
        x = self.block2(x)
        return self.fc(self.flatten(self.pool(x)))  # (N, num_classes)


def build_demo_model(in_channels: int = 1, num_classes: int = 10) -> DemoNet:
    """The untrained demo architecture."""
    return DemoNet(in_channels=in_channels, num_classes=num_classes)


def demo_weights_path(data: DataSplits, cache_dir: Path, seed: int = 0) -> Path:
    """Where the demo weights trained on ``data`` with ``seed`` are cached.

    The key covers the architecture (its repr), the seed, the training recipe and the
    split indices, so a change to any of them trains afresh instead of reusing weights.
    """
    model = build_demo_model(data.input_shape[0], data.num_classes)
    key = "|".join([repr(model), str(seed), _RECIPE, data.describe()["split_sha256"]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"demo-digits-{digest}.pt"


def train_demo_model(data: DataSplits, *, seed: int = 0, epochs: int = DEMO_EPOCHS) -> DemoNet:
    """Train the demo CNN on the train split only (never on val/test) and return it in eval mode."""
    # fork_rng: seeding here must not reset the caller's global RNG stream. One thread: the
    # layers are tiny, and on a shared 2-core machine two threads spin against each other
    # (measured 0.1 s vs 1 s per step under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(data, seed=seed, epochs=epochs)
    finally:
        torch.set_num_threads(threads)


def _train(data: DataSplits, *, seed: int, epochs: int) -> DemoNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_demo_model(data.input_shape[0], data.num_classes)
        steps_per_epoch = -(-len(data.train) // DEMO_BATCH_SIZE)
        optimizer = torch.optim.Adam(model.parameters(), lr=DEMO_LR, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=DEMO_LR, total_steps=epochs * steps_per_epoch
        )
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(epochs):
            for x, y in data.batches("train", DEMO_BATCH_SIZE, shuffle=True, seed=seed + epoch):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def load_demo_model(data: DataSplits, *, cache_dir: Path, seed: int = 0) -> DemoNet:
    """The trained demo teacher: loaded from the cache, or trained now and cached."""
    path = demo_weights_path(data, cache_dir, seed)
    model = build_demo_model(data.input_shape[0], data.num_classes)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:
            pass
    model = train_demo_model(data, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file then rename: parallel workers never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model
