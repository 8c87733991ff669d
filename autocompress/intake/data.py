"""Data intake: seeded, stratified train/val/test splits and the preprocessing the model expects."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from autocompress.errors import DataSpecError
from autocompress.intake.data_sources import (
    _load_cifar10,
    _load_data_factory,
    _load_digits,
    _load_imagefolder,
    _Source,
    _sources_from_result,
)
from autocompress.intake.sample_targets import ANY, CLASSES, are_class_labels, are_values
from autocompress.intake.specs import (
    _DATA_FORMS,
    DEFAULT_VAL_FRACTION,
    DIGITS_DATA_SPEC,
    DIGITS_FRACTIONS,
    SPLIT_NAMES,
    _is_factory_target,
    default_cache_dir,
)
from autocompress.intake.user_task import is_task_spec, load_user_task


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


def load_data(
    spec: str,
    *,
    input_size: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tokenizer: str | None = None,
) -> DataSplits:
    """Load a data spec and split it into seeded, stratified train / val / test.

    ``digits``: stratified 60/20/20 of the whole set. Folder and factory data: the train
    part is split stratified into train / val (``val_fraction`` to val) unless a val part
    exists; the test part becomes test. ``mean``/``std`` default to per-channel statistics of
    the train split, except for float data from a factory, which is taken as already
    preprocessed (the teacher was trained on exactly what the factory yields).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataSpecError(f"empty data spec {spec!r}; use {_DATA_FORMS}")
    spec = spec.strip()
    if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
        raise DataSpecError(f"input size must be a positive integer, got {input_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataSpecError(f"validation fraction must lie in (0, 1), got {val_fraction}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rng = np.random.default_rng(seed)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "text":
        return _load_text(spec, rest, tokenizer, rng, seed)

    val_src: _Source | None = None
    identity_norm = False
    if is_task_spec(spec):
        given = load_user_task(spec).data
        if isinstance(given, str):  # the task names a data spec: load that one
            return load_data(given, input_size=input_size, seed=seed, cache_dir=cache_dir,
                             val_fraction=val_fraction, mean=mean, std=std, tokenizer=tokenizer)
    if spec == DIGITS_DATA_SPEC:
        full, classes, scale = _load_digits()
        parts = _stratified_split(full.y.numpy(), DIGITS_FRACTIONS, rng)
        train, val, test = (_take(full, p) for p in parts)
        method = "stratified 60/20/20 of sklearn digits"
    else:
        if sep and prefix == "imagefolder":
            train_src, val_src, test_src, classes = _load_imagefolder(rest, input_size, cache)
            scale = 255.0
        elif sep and prefix == "cifar10":
            train_src, test_src, classes = _load_cifar10(rest)
            scale = 255.0
        elif is_task_spec(spec) or (sep and _is_factory_target(spec)):
            train_src, val_src, test_src, classes = (
                _task_sources(spec) if is_task_spec(spec) else _load_data_factory(spec))
            scale = 255.0 if train_src.x.dtype == torch.uint8 else 1.0
            identity_norm = train_src.x.dtype != torch.uint8
        else:
            raise DataSpecError(f"unknown data spec {spec!r}; use {_DATA_FORMS}")
        if val_src is None:
            train_part, val_part = _split_positions(
                train_src.y, (1.0 - val_fraction, val_fraction), rng
            )
            train, val = _take(train_src, train_part), _take(train_src, val_part)
            kind = "stratified" if are_class_labels(train_src.y) else "random"
            method = f"{kind} {1 - val_fraction:.0%}/{val_fraction:.0%} train/val of train part"
        else:
            train = _take(train_src, rng.permutation(len(train_src.y)))
            val = _take(val_src, rng.permutation(len(val_src.y)))
            method = "train, val and test parts as given"
        test = _take(test_src, rng.permutation(len(test_src.y)))
        method += "; test part as test"

    for name, split in zip(SPLIT_NAMES, (train, val, test), strict=True):
        if len(split) == 0:
            raise DataSpecError(
                f"the {name} split of {spec!r} is empty; add images (a class needs at least 2 "
                "so that one can go to validation)"
            )
    if train.x.ndim == 2:
        return _flat_splits(spec, seed, classes, (train, val, test), method,
                            input_size=input_size, mean=mean, std=std)
    size = (input_size, input_size) if input_size else tuple(int(s) for s in train.x.shape[-2:])
    channels = int(train.x.shape[1])
    if mean is None or std is None:
        if identity_norm:
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            mean, std = _channel_stats(train.x, scale)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise DataSpecError(
            f"mean {mean} / std {std} must give {channels} values (one per channel), std > 0"
        )
    return DataSplits(
        spec=spec,
        seed=seed,
        classes=list(classes),
        train=train,
        val=val,
        test=test,
        image_size=(int(size[0]), int(size[1])),
        mean=mean,
        std=std,
        value_scale=scale,
        split_method=method,
    )


def _flat_splits(spec: str, seed: int, classes: Sequence[str], parts: tuple[Split, Split, Split],
                 method: str, *, input_size: int | None, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> DataSplits:
    """Splits of flat inputs (token ids, feature vectors, packed tensors): fed as they are,
    so image options cannot apply to them."""
    if input_size is not None or mean is not None or std is not None:
        raise DataSpecError(
            f"--input-size, --mean and --std apply to images; {spec!r} yields flat inputs "
            f"{tuple(parts[0].x.shape[1:])} {parts[0].x.dtype}, fed to the model as they are "
            "(scale them in the dataset); drop those options")
    train, val, test = parts
    return DataSplits(spec=spec, seed=seed, classes=list(classes), train=train, val=val,
                      test=test, image_size=(0, 0), mean=(), std=(), value_scale=1.0,
                      split_method=method)


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


TEXT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test of a text file


def _load_text(spec: str, rest: str, tokenizer: str | None, rng: np.random.Generator,
               seed: int) -> DataSplits:
    """Token ids of a ``text:`` file (``intake.text``), split stratified 80/10/10."""
    from autocompress.intake.text import load_text_tokens

    x, y, classes, max_length = load_text_tokens(rest, tokenizer=tokenizer)
    full = _Source(x, y)
    train, val, test = (_take(full, p) for p in _stratified_split(y.numpy(), TEXT_FRACTIONS,
                                                                   rng))
    return DataSplits(spec=spec, seed=seed, classes=classes, train=train, val=val, test=test,
                      image_size=(0, 0), mean=(), std=(), value_scale=1.0,
                      split_method=f"stratified 80/10/10 of {len(y)} texts, {max_length} "
                      "tokens")


def _task_sources(spec: str) -> tuple[_Source, _Source | None, _Source, list[str]]:
    """A task's datasets; any numeric target when the task brings its own metric."""
    task = load_user_task(spec)
    return _sources_from_result(task.data, spec, CLASSES if task.metric.is_top1 else ANY,
                                task.layout)


def _split_positions(
    y: torch.Tensor, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Stratified by class for class labels; a seeded random split of other targets (each
    part after the first gets at least one sample when there are enough)."""
    if are_class_labels(y):
        return _stratified_split(y.numpy(), fractions, rng)
    n = int(y.shape[0])
    order = rng.permutation(n).astype(np.int64)
    counts = _later_part_counts(n, fractions)
    bounds = np.cumsum([n - sum(counts), *counts])
    return list(np.split(order, bounds[:-1]))


def _later_part_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Samples of ``n`` for each part after the first: about its fraction, at least one
    when there are enough for every part, and never all of them (the first part, train,
    keeps at least one)."""
    counts = [round(f * n) for f in fractions[1:]]
    if n >= len(fractions):
        counts = [max(1, c) for c in counts]
    while sum(counts) >= n and any(counts):
        counts[counts.index(max(counts))] -= 1
    return counts


def _take(src: _Source, positions: np.ndarray) -> Split:
    idx = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    return Split(x=src.x[idx], y=src.y[idx], indices=idx)


def _stratified_split(
    y: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split positions 0..len(y)-1 so every part holds about ``fraction`` of each class.

    Parts after the first get at least one sample of a class that has enough samples for
    every part; the first part (train) takes the remainder. Each part comes back in a seeded
    random order, so any prefix of it mixes classes.
    """
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        n = len(members)
        counts = _later_part_counts(n, fractions)
        start = n - sum(counts)
        parts[0].append(members[:start])
        for i, count in enumerate(counts, start=1):
            parts[i].append(members[start : start + count])
            start += count
    out = []
    for chunks in parts:
        joined = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        out.append(rng.permutation(joined).astype(np.int64))
    return out


def _channel_stats(x: torch.Tensor, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of x / scale (population std), exact and fast for uint8.

    CIFAR's train split is 138M values: uint8 data goes through a 256-bin histogram per
    channel instead of float64 copies (0.3 s instead of 10 s here).
    """
    channels = x.shape[1]
    if x.dtype == torch.uint8:
        hist = torch.stack(
            [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(channels)]
        ).to(torch.float64)  # (C, 256)
        values = torch.arange(256, dtype=torch.float64) / scale
        count = hist.sum(dim=1)
        mean = (hist * values).sum(dim=1) / count
        var = (hist * values * values).sum(dim=1) / count - mean * mean
    else:
        total = torch.zeros(channels, dtype=torch.float64)
        total_sq = torch.zeros(channels, dtype=torch.float64)
        n = 0
        for start in range(0, x.shape[0], 2048):
            chunk = x[start : start + 2048].to(torch.float64) / scale
            total += chunk.sum(dim=(0, 2, 3))
            total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
            n += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
        mean = total / n
        var = total_sq / n - mean * mean
    std = var.clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant channel: no scaling
    return tuple(mean.tolist()), tuple(std.tolist())
