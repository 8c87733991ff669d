"""The loaded data: three seeded splits in stored form, the preprocessing the model expects,
and batches of them (``data_loading`` makes them from a spec)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autocompress.errors import DataSpecError
from autocompress.intake.sample_targets import are_class_labels, are_values
from autocompress.intake.specs import SPLIT_NAMES


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class Split:
    """One split in stored form: ``x`` (N, C, H, W) uint8 or float32 images, or inputs fed as
    they are ((N, L) or (N, L, F), ``DataSplits.is_flat``), ``y`` (N,) int64 class
    labels, or a task's other targets (N, ...) int64 / float32 (``intake.sample_targets``).

    ``indices`` are the positions of these samples in their source (the whole digits set,
    or the train / val / test folder), in the seeded order the split is stored in.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:  # the default would print every pixel
        return f"Split(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype})"


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class DataSplits:
    """Three seeded, stratified, disjoint splits plus the preprocessing the model expects.

    Stored values are divided by ``value_scale`` (255 for uint8 images, 16 for digits, 1 for
    float data) to reach 0..1, resized to ``image_size`` and normalised with ``mean``/``std``.
    """

    spec: str
    seed: int
    classes: list[str]
    train: Split
    val: Split
    test: Split
    image_size: tuple[int, int]  # (H, W) fed to the model
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_scale: float
    split_method: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_classes(self) -> bool:
        """Targets are class labels (top-1 can score them; splits are stratified)."""
        return are_class_labels(self.train.y)

    @property
    def targets_are_values(self) -> bool:
        """Float targets (regression): the model's outputs are values, not logits."""
        return are_values(self.train.y)

    @property
    def is_flat(self) -> bool:
        """Inputs fed to the model as they are (no image size): flat (N, L) token ids
        (``text:`` data, a task's int64 ids), feature vectors, a task's packed input tensors
        (``intake.sample_inputs``), or (N, L, F) sequences (``as_sequences``)."""
        return self.image_size == (0, 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one preprocessed image; (L,) or (L, F) for inputs fed as they are."""
        if self.is_flat:
            return tuple(int(d) for d in self.train.x.shape[1:])
        return (int(self.train.x.shape[1]), *self.image_size)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train.x.shape[1:])

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise DataSpecError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Stored (N, C, h, w) -> float32 (N, C, H, W): scale to 0..1, resize, normalise.
        Flat inputs pass unchanged."""
        if self.is_flat:
            return x
        out = x.to(torch.float32)
        if tuple(out.shape[-2:]) != self.image_size:
            shrinking = out.shape[-1] > self.image_size[1] or out.shape[-2] > self.image_size[0]
            out = F.interpolate(
                out,
                size=self.image_size,
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )
        # (x / scale - mean) / std as one fused multiply-add: x * gain + bias
        std = torch.tensor(self.std, dtype=torch.float64)
        gain = (1.0 / (self.value_scale * std)).to(torch.float32).view(1, -1, 1, 1)
        bias = (-torch.tensor(self.mean, dtype=torch.float64) / std).to(torch.float32)
        return torch.addcmul(bias.view(1, -1, 1, 1), out, gain)

    def batches(
        self, split_name: str, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield preprocessed (x: float32 NCHW images, or inputs as stored; y as stored)
        batches; the last one may be short."""
        split = self.split(split_name)
        if batch_size < 1:
            raise DataSpecError(f"batch size must be a positive integer, got {batch_size}")
        n = len(split)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        )
        for start in range(0, n, batch_size):
            if order is None:
                xb, yb = split.x[start : start + batch_size], split.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                # numpy's single-threaded gather: torch's threaded one was 10x slower on a
                # busy 2-core machine (7 s vs 0.6 s per CIFAR epoch)
                xb = torch.from_numpy(split.x.numpy()[idx.numpy()])
                yb = split.y[idx]
            yield self.preprocess(xb), yb

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Real preprocessed train images, (batch, C, H, W), for tracing and shape checks."""
        x = self.train.x[:batch]
        if x.shape[0] < batch:  # fewer train images than asked: repeat them
            reps = -(-batch // max(1, x.shape[0]))
            x = x.repeat(reps, *[1] * (x.ndim - 1))[:batch]
        return self.preprocess(x)

    def split_sha256(self) -> str:
        """sha256 over the ordered indices of every split: equal hashes, equal splits."""
        digest = hashlib.sha256()
        for name in SPLIT_NAMES:
            indices = self.split(name).indices.to(torch.int64).numpy()
            digest.update(name.encode() + b":" + indices.astype("<i8").tobytes() + b";")
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Plain-JSON record of what was loaded and how it was split."""
        return {
            "spec": self.spec,
            "seed": self.seed,
            "sizes": {name: len(self.split(name)) for name in SPLIT_NAMES},
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "stored_shape": list(self.stored_shape),
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "split_method": self.split_method,
            "split_sha256": self.split_sha256(),
        }


def as_sequences(data: DataSplits) -> DataSplits | None:
    """The same splits with each one-channel sample (H, W) fed as it is, as a sequence of H
    steps of W features (what an LSTM, a transformer encoder or a Conv1d over channels
    takes), float32, unscaled like every input fed as it is; None unless the samples are
    one-channel images at their own size with the default normalisation (a 2-D sample is
    read as a one-channel image first: the task's model says which it is)."""
    if data.is_flat or data.train.x.ndim != 4 or int(data.train.x.shape[1]) != 1 \
            or tuple(data.train.x.shape[-2:]) != data.image_size:
        return None
    train, val, test = (Split(s.x[:, 0].to(torch.float32), s.y, s.indices)
                        for s in (data.train, data.val, data.test))
    return DataSplits(spec=data.spec, seed=data.seed, classes=list(data.classes), train=train,
                      val=val, test=test, image_size=(0, 0), mean=(), std=(),
                      value_scale=1.0, split_method=data.split_method
                      + f"; samples {tuple(train.x.shape[1:])} fed as sequences")
