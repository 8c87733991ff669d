"""Loading a data spec into ``DataSplits``: the source of each spec form (digits, image
folders, CIFAR-10, ``text:`` files, factories and tasks), seeded and stratified train / val /
test splits of it, and the preprocessing the model expects (image size, per-channel
normalisation; inputs fed as they are keep none)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autocompress.errors import DataSpecError
from autocompress.intake.data import DataSplits, Split
from autocompress.intake.data_sources import (
    _load_cifar10,
    _load_data_factory,
    _load_digits,
    _load_imagefolder,
    _Source,
    _sources_from_result,
)
from autocompress.intake.sample_targets import ANY, CLASSES, are_class_labels
from autocompress.intake.specs import (
    _DATA_FORMS,
    DEFAULT_VAL_FRACTION,
    DIGITS_DATA_SPEC,
    DIGITS_FRACTIONS,
    SPLIT_NAMES,
    _is_factory_target,
    default_cache_dir,
)
from autocompress.intake.splitting import split_positions, stratified_split
from autocompress.intake.user_task import is_task_spec, load_user_task


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
    spec = _checked_spec(spec, input_size, val_fraction)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rng = np.random.default_rng(seed)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "text":
        return _load_text(spec, rest, tokenizer, rng, seed)
    if is_task_spec(spec):
        given = load_user_task(spec).data
        if isinstance(given, str):  # the task names a data spec: load that one
            return load_data(given, input_size=input_size, seed=seed, cache_dir=cache_dir,
                             val_fraction=val_fraction, mean=mean, std=std, tokenizer=tokenizer)
    if spec == DIGITS_DATA_SPEC:
        full, classes, scale = _load_digits()
        train, val, test = (_take(full, p)
                            for p in stratified_split(full.y.numpy(), DIGITS_FRACTIONS, rng))
        loaded = _Loaded((train, val, test), classes, scale,
                         "stratified 60/20/20 of sklearn digits")
    else:
        loaded = _load_parts(spec, input_size, cache, val_fraction, rng)
    for name, split in zip(SPLIT_NAMES, loaded.splits, strict=True):
        if len(split) == 0:
            raise DataSpecError(
                f"the {name} split of {spec!r} is empty; add images (a class needs at least 2 "
                "so that one can go to validation)"
            )
    if loaded.splits[0].x.ndim == 2:
        return _flat_splits(spec, seed, loaded.classes, loaded.splits, loaded.method,
                            input_size=input_size, mean=mean, std=std)
    return _image_splits(spec, seed, loaded, input_size, mean, std)


def _checked_spec(spec: str, input_size: int | None, val_fraction: float) -> str:
    """The spec without surrounding blanks; a DataSpecError for a bad spec or option."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataSpecError(f"empty data spec {spec!r}; use {_DATA_FORMS}")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
        raise DataSpecError(f"input size must be a positive integer, got {input_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataSpecError(f"validation fraction must lie in (0, 1), got {val_fraction}")
    return spec.strip()


@dataclass(eq=False)
class _Loaded:
    """A spec's three splits before preprocessing is chosen: with the class names, the
    divisor to 0..1 of the stored values, how the splits were made, and whether the values
    are taken as already normalised (float data from a factory or task)."""

    splits: tuple[Split, Split, Split]
    classes: list[str]
    scale: float
    method: str
    identity_norm: bool = False


def _load_parts(spec: str, input_size: int | None, cache: Path, val_fraction: float,
                rng: np.random.Generator) -> _Loaded:
    """An image folder's, CIFAR-10's, a factory's or a task's data split (train/val from
    the train part unless a val part is given, test from the test part)."""
    prefix, sep, rest = spec.partition(":")
    val_src: _Source | None = None
    identity_norm = False
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
        train_part, val_part = split_positions(
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
    return _Loaded((train, val, test), list(classes), scale, method + "; test part as test",
                   identity_norm)


def _image_splits(spec: str, seed: int, loaded: _Loaded, input_size: int | None,
                  mean: Sequence[float] | None, std: Sequence[float] | None) -> DataSplits:
    """Splits of images: resized to ``input_size`` (default: as stored) and normalised with
    ``mean``/``std`` (default: the train split's per-channel statistics)."""
    train, val, test = loaded.splits
    size = (input_size, input_size) if input_size else tuple(int(s) for s in train.x.shape[-2:])
    channels = int(train.x.shape[1])
    if mean is None or std is None:
        if loaded.identity_norm:
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            mean, std = _channel_stats(train.x, loaded.scale)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise DataSpecError(
            f"mean {mean} / std {std} must give {channels} values (one per channel), std > 0"
        )
    return DataSplits(
        spec=spec,
        seed=seed,
        classes=list(loaded.classes),
        train=train,
        val=val,
        test=test,
        image_size=(int(size[0]), int(size[1])),
        mean=mean,
        std=std,
        value_scale=loaded.scale,
        split_method=loaded.method,
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


TEXT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test of a text file


def _load_text(spec: str, rest: str, tokenizer: str | None, rng: np.random.Generator,
               seed: int) -> DataSplits:
    """Token ids of a ``text:`` file (``intake.text``), split stratified 80/10/10."""
    from autocompress.intake.text import load_text_tokens

    x, y, classes, max_length = load_text_tokens(rest, tokenizer=tokenizer)
    full = _Source(x, y)
    train, val, test = (_take(full, p) for p in stratified_split(y.numpy(), TEXT_FRACTIONS,
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


def _take(src: _Source, positions: np.ndarray) -> Split:
    idx = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    return Split(x=src.x[idx], y=src.y[idx], indices=idx)


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
