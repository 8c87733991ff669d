"""Intake: model/weights/data specs -> a ``Task`` (teacher model + seeded data splits).

Model specs:  ``torchvision:NAME`` | ``timm:NAME`` | ``path/to/file.py:factory`` |
              ``package.module:factory`` | ``demo``
Data specs:   ``digits`` | ``imagefolder:ROOT`` | ``cifar10:ROOT`` |
              ``package.module:factory`` (or ``file.py:factory``)

Splits: ``train`` fine-tunes candidates, ``val`` scores them during the search, ``test`` is
reported once for the chosen candidate. Every split is stratified and drawn with a seeded
shuffle, never by index: ImageFolder lists samples class by class, so a tail "validation"
slice would hold a single class. Images are decoded once into a uint8 cache so that epochs
never re-decode JPEGs.

Every user mistake raises ``ModelSpecError`` / ``DataSpecError`` with a one-line message that
names the bad value and says how to fix it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import DataSpecError, InputError, ModelSpecError, one_line

DEMO_MODEL_SPEC = "demo"
DIGITS_DATA_SPEC = "digits"
DEFAULT_VAL_FRACTION = 0.1
DIGITS_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test of the 1797 digits
SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
_IMAGE_CACHE_VERSION = 1
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MODEL_FORMS = (
    "torchvision:NAME, timm:NAME, path/to/file.py:factory, package.module:factory or demo"
)
_DATA_FORMS = "digits, imagefolder:ROOT, cifar10:ROOT or package.module:factory"


def default_cache_dir() -> Path:
    """``$AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``."""
    env = os.environ.get("AUTOCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autocompress"


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class Split:
    """One split in stored form: ``x`` (N, C, H, W) uint8 or float32, ``y`` (N,) int64.

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
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (int(self.train.x.shape[1]), *self.image_size)

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return (int(c), int(h), int(w))

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise DataSpecError(f"unknown split {name!r}; use one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Stored (N, C, h, w) -> float32 (N, C, H, W): scale to 0..1, resize, normalise."""
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
        """Yield preprocessed (x float32 NCHW, y int64) batches; the last one may be short."""
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
            x = x.repeat(reps, 1, 1, 1)[:batch]
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


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class _Source:
    """A loaded but unsplit part of a data set (e.g. the train folder)."""

    x: torch.Tensor
    y: torch.Tensor


def load_data(
    spec: str,
    *,
    input_size: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
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

    val_src: _Source | None = None
    identity_norm = False
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
        elif sep and _is_factory_target(spec):
            train_src, val_src, test_src, classes = _load_data_factory(spec)
            scale = 255.0 if train_src.x.dtype == torch.uint8 else 1.0
            identity_norm = train_src.x.dtype != torch.uint8
        else:
            raise DataSpecError(f"unknown data spec {spec!r}; use {_DATA_FORMS}")
        if val_src is None:
            train_part, val_part = _stratified_split(
                train_src.y.numpy(), (1.0 - val_fraction, val_fraction), rng
            )
            train, val = _take(train_src, train_part), _take(train_src, val_part)
            method = f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%} train/val of train part"
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
        counts = [round(f * n) for f in fractions[1:]]
        if n >= len(fractions):
            counts = [max(1, c) for c in counts]
        while sum(counts) >= n and any(counts):  # keep >= 1 sample for the first part
            counts[counts.index(max(counts))] -= 1
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


def _load_digits() -> tuple[_Source, list[str], float]:
    from sklearn.datasets import load_digits  # lazy: only the digits spec needs sklearn

    digits = load_digits()
    # 8x8 images with integer values 0..16: stored as uint8, scaled by 16 at preprocessing.
    x = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return _Source(x, y), [str(c) for c in digits.target_names], 16.0


# ---- ImageFolder ---------------------------------------------------------------------


def _load_imagefolder(
    root_text: str, input_size: int | None, cache_dir: Path
) -> tuple[_Source, _Source | None, _Source, list[str]]:
    if not root_text:
        raise DataSpecError("imagefolder spec needs a folder: use imagefolder:ROOT")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise DataSpecError(f"data root {root} does not exist or is not a folder; check the path")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    if not train_dir.is_dir():
        raise DataSpecError(
            f"no train folder in {root}; expected {root}/train/<class>/<image> plus "
            f"{root}/val or {root}/test in the same layout"
        )
    if not val_dir.is_dir() and not test_dir.is_dir():
        raise DataSpecError(
            f"no val or test folder in {root}; add {root}/test/<class>/<image> (held-out images "
            "for the final report) beside train/"
        )
    classes, train_files = _scan_folder(train_dir, None)
    mode, size = _probe_image(train_files[0][0], input_size)
    train = _decode_folder(train_dir, train_files, mode, size, cache_dir)
    # Both present: use them as given. One present: it is the test part and val is carved
    # out of train (stratified), so the search never selects on the reported test images.
    val = None
    if val_dir.is_dir() and test_dir.is_dir():
        val = _decode_folder(val_dir, _scan_folder(val_dir, classes)[1], mode, size, cache_dir)
    held_out = test_dir if test_dir.is_dir() else val_dir
    test = _decode_folder(held_out, _scan_folder(held_out, classes)[1], mode, size, cache_dir)
    return train, val, test, classes


def _scan_folder(
    folder: Path, classes: list[str] | None
) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder layout: folder/<class>/**/<image>. ``classes`` None: take them from here."""
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if not dirs:
            raise DataSpecError(
                f"no class folders in {folder}; put each class's images in {folder}/<class>/"
            )
        if len(dirs) < 2:
            raise DataSpecError(
                f"only one class folder ({dirs[0]}) in {folder}; classification needs at least "
                "2 class folders"
            )
        classes = dirs
    else:
        unknown = [d for d in dirs if d not in classes]
        if unknown:
            raise DataSpecError(
                f"{folder} has class folders not in train: {', '.join(unknown[:5])}; "
                "use the same class folder names as train/"
            )
    samples: list[tuple[str, int]] = []  # plain strings: pathlib costs seconds at 60k files
    empty: list[str] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        before = len(samples)
        for dirpath, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs.sort()  # os.walk order is file-system order: sort for determinism
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), label))
        if len(samples) == before:
            empty.append(name)
    if not samples:
        raise DataSpecError(
            f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            f"add images under {folder}/<class>/"
        )
    if empty and folder.name == "train":
        raise DataSpecError(
            f"class folder(s) {', '.join(empty[:5])} in {folder} hold no images; "
            "add images or remove the empty folders"
        )
    return classes, samples


def _probe_image(path: str, input_size: int | None) -> tuple[str, tuple[int, int]]:
    """Colour mode and (H, W) to decode every image to: the first image decides."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            size = (input_size, input_size) if input_size else (img.height, img.width)
    except Exception as exc:  # any decoder failure is a bad file to the user
        raise DataSpecError(
            f"cannot read image {path}: {one_line(exc, typed=True)}; remove or fix it"
        ) from exc
    return mode, size


def _decode_image(path: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 (C, H, W) at ``size`` in ``mode`` ("L" or "RGB")."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        if (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_folder(
    folder: Path, files: list[tuple[str, int]], mode: str, size: tuple[int, int], cache_dir: Path
) -> _Source:
    """Decode every image once into a uint8 array cached under cache_dir/images/.

    The cache key covers the folder, decode mode and size, and every file's relative path,
    byte size and mtime, so editing, adding or removing an image decodes again.
    """
    listing = []
    prefix = len(str(folder)) + 1  # every path was built as folder/<class>/...
    for path, label in files:
        st = os.stat(path)
        listing.append([path[prefix:], label, st.st_size, st.st_mtime_ns])
    key_text = json.dumps(
        {
            "v": _IMAGE_CACHE_VERSION,
            "folder": str(folder.resolve()),
            "mode": mode,
            "size": list(size),
            "files": listing,
        },
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    cache_file = cache_dir / "images" / f"{folder.name}-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                return _Source(torch.from_numpy(cached["x"]), torch.from_numpy(cached["y"]))
        except Exception:  # torn cache file: decode again below
            pass

    def decode(item: tuple[Path, int]) -> np.ndarray:
        try:
            return _decode_image(item[0], mode, size)
        except Exception as exc:
            raise DataSpecError(
                f"cannot read image {item[0]}: {one_line(exc, typed=True)}; remove or fix it"
            ) from exc

    # PIL releases the GIL while decoding, so threads overlap the JPEG work.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        x = np.stack(list(pool.map(decode, files)))
    y = np.array([label for _, label in files], dtype=np.int64)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(cache_file, lambda fh: np.savez(fh, x=x, y=y))
    return _Source(torch.from_numpy(x), torch.from_numpy(y))


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via a temp file and rename, so concurrent readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- CIFAR-10 and factories ----------------------------------------------------------


def _load_cifar10(root_text: str) -> tuple[_Source, _Source, list[str]]:
    if not root_text:
        raise DataSpecError("cifar10 spec needs a download folder: use cifar10:ROOT")
    from torchvision.datasets import CIFAR10

    root = Path(root_text).expanduser()
    try:
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except Exception as exc:  # URLError, checksum errors, HTTP errors...
        raise DataSpecError(
            f"could not download CIFAR-10 into {root} ({one_line(exc, typed=True)}); without "
            "network, unpack a local copy as ROOT/train/<class>/*.png and "
            "ROOT/test/<class>/*.png and use --data imagefolder:ROOT"
        ) from exc

    def source(ds: Any) -> _Source:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC->NCHW
        return _Source(x, torch.as_tensor(ds.targets, dtype=torch.int64))

    return source(train), source(test), list(train.classes)


def _is_factory_target(spec: str) -> bool:
    target, _, attr = spec.rpartition(":")
    return (
        bool(target)
        and bool(_DOTTED.match(attr))
        and (target.endswith(".py") or bool(_DOTTED.match(target)))
    )


def _load_data_factory(spec: str) -> tuple[_Source, _Source | None, _Source, list[str]]:
    factory = _resolve_factory(spec, DataSpecError, "data")
    try:
        result = factory()
    except Exception as exc:  # user code: report, do not crash
        raise DataSpecError(
            f"data factory {spec!r} raised {one_line(exc, typed=True)}; fix the factory"
        ) from exc
    if isinstance(result, dict):
        missing = [k for k in ("train", "test") if k not in result]
        if missing:
            raise DataSpecError(
                f"data factory {spec!r} returned a dict without {', '.join(missing)}; "
                "return {'train': dataset, 'test': dataset} (optionally 'val')"
            )
        parts = {k: result[k] for k in ("train", "val", "test") if result.get(k) is not None}
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        parts = {"train": result[0], "test": result[1]}
    else:
        raise DataSpecError(
            f"data factory {spec!r} returned {type(result).__name__}; return "
            "(train_dataset, test_dataset) or a dict with 'train' and 'test'"
        )
    sources = {name: _materialize(ds, spec, name) for name, ds in parts.items()}
    shapes = {tuple(s.x.shape[1:]) for s in sources.values()}
    if len(shapes) > 1:
        raise DataSpecError(
            f"data factory {spec!r} yields images of different shapes {sorted(shapes)} across "
            "train/test; resize to one shape in the datasets"
        )
    if len({s.x.dtype for s in sources.values()}) > 1:
        raise DataSpecError(
            f"data factory {spec!r} yields uint8 images in one dataset and floats in another; "
            "use one dtype"
        )
    num_labels = int(max(int(s.y.max()) for s in sources.values())) + 1
    names = getattr(parts["train"], "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= num_labels:
        classes = [str(c) for c in names]
    else:
        classes = [str(i) for i in range(num_labels)]
    if len(classes) < 2:
        raise DataSpecError(
            f"data factory {spec!r} yields only one class; classification needs at least 2"
        )
    return sources["train"], sources.get("val"), sources["test"], classes


def _materialize(dataset: Any, spec: str, name: str) -> _Source:
    """Read a whole (image tensor, int label) dataset into stacked tensors."""
    try:
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            items = [dataset[i] for i in range(len(dataset))]
        else:  # an iterable-style dataset
            items = list(dataset)
    except Exception as exc:
        raise DataSpecError(
            f"reading the {name} dataset of {spec!r} failed: {one_line(exc, typed=True)}"
        ) from exc
    if not items:
        raise DataSpecError(f"the {name} dataset of {spec!r} is empty; it must yield samples")
    images, labels = [], []
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataSpecError(
                f"{name} sample {i} of {spec!r} is {type(item).__name__}; datasets must yield "
                "(image tensor (C, H, W), int label)"
            )
        image, label = item[0], item[1]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        if not isinstance(image, torch.Tensor) or image.ndim not in (2, 3):
            shape = getattr(image, "shape", None)
            got = (
                f"{type(image).__name__} {tuple(shape)}"
                if shape is not None
                else type(image).__name__
            )
            raise DataSpecError(
                f"{name} sample {i} of {spec!r} has image {got}; yield a (C, H, W) tensor "
                "(apply ToTensor)"
            )
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        elif isinstance(label, np.ndarray) and label.size == 1:
            label = label.reshape(()).item()
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or label < 0:
            raise DataSpecError(
                f"{name} sample {i} of {spec!r} has label {label!r}; labels must be ints >= 0"
            )
        images.append(image if image.ndim == 3 else image.unsqueeze(0))
        labels.append(int(label))
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DataSpecError(
            f"{name} images of {spec!r} differ in shape ({len(shapes)} shapes, e.g. "
            f"{sorted(shapes)[:2]}); resize to one shape in the dataset"
        )
    x = torch.stack(images)
    x = x if x.dtype == torch.uint8 else x.to(torch.float32)
    return _Source(x.contiguous(), torch.tensor(labels, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """Build the model a spec names, load ``weights`` strictly, check it accepts the input.

    ``input_shape`` (C, H, W) or else ``input_size`` (channels read off the first conv) is
    checked with one forward pass; with neither, no forward check runs. The model comes
    back on CPU in eval mode.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec {spec!r}; use {_MODEL_FORMS}")
    spec = spec.strip()
    for label, value in (("--num-classes", num_classes), ("--input-size", input_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ModelSpecError(f"{label} must be a positive integer, got {value!r}")
    model = _build_model(spec, num_classes, input_shape)
    if weights is not None:
        load_weights(model, weights)
    model = model.cpu().eval()
    if input_shape is not None:
        shape: tuple[int, ...] | None = (1, *input_shape)
    elif input_size is not None:
        shape = (1, _in_channels(model), input_size, input_size)
    else:
        shape = None
    if shape is not None:
        outputs = check_model_input(model, torch.zeros(shape), spec)
        if num_classes is not None and outputs != num_classes:
            raise ModelSpecError(
                f"model {spec!r} outputs {outputs} classes but {num_classes} are needed; make "
                "its factory accept num_classes= or pass --num-classes to match the model"
            )
    return model


def _build_model(
    spec: str, num_classes: int | None, input_shape: tuple[int, int, int] | None
) -> nn.Module:
    prefix, sep, name = spec.partition(":")
    if spec == DEMO_MODEL_SPEC:
        from autocompress.demo import build_demo_model

        channels = input_shape[0] if input_shape else 1
        return build_demo_model(channels, num_classes or 10)
    if sep and prefix == "torchvision":
        return _build_torchvision(name, num_classes)
    if sep and prefix == "timm":
        return _build_timm(name, num_classes)
    if sep and _is_factory_target(spec):
        factory = _resolve_factory(spec, ModelSpecError, "model")
        model = _call_model_factory(factory, spec, num_classes)
        if not isinstance(model, nn.Module):
            raise ModelSpecError(
                f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
                "return the model instance"
            )
        return model
    hint = ""
    from torchvision import models

    if spec in models.list_models(module=models):
        hint = f" (did you mean torchvision:{spec}?)"
    raise ModelSpecError(f"unknown model spec {spec!r}; use {_MODEL_FORMS}{hint}")


def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    from torchvision import models

    names = models.list_models(module=models)  # classification models only
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join('torchvision:' + c for c in close)}?"
            if close
            else ("; see torchvision.models.list_models(module=torchvision.models)")
        )
        raise ModelSpecError(f"unknown torchvision classification model {name!r}{hint}")
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return models.get_model(name, **kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"torchvision model {name!r} could not be built: {one_line(exc, typed=True)}"
        ) from exc


def _build_timm(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelSpecError(
            f"timm is not installed; pip install timm (needed for timm:{name})"
        ) from exc
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelSpecError(f"unknown timm model {name!r}{hint}")
    kwargs: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, **kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"timm model {name!r} could not be built: {one_line(exc, typed=True)}"
        ) from exc


def _call_model_factory(factory: Callable[..., Any], spec: str, num_classes: int | None) -> Any:
    """Call the factory, passing num_classes= only when it accepts that keyword."""
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # builtins and some C callables have no signature
            params = []
        if any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params):
            kwargs["num_classes"] = num_classes
    try:
        return factory(**kwargs)
    except Exception as exc:  # user code: report, do not crash
        raise ModelSpecError(
            f"model factory {spec!r} raised {one_line(exc, typed=True)}; fix the factory "
            "(it is called with no arguments, or num_classes= when it accepts it)"
        ) from exc


def _resolve_factory(spec: str, error: type[InputError], what: str) -> Callable[..., Any]:
    """``file.py:name`` or ``package.module:name`` (name may be dotted) -> the callable."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser(), error, what)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # ImportError or an error inside the module
            raise error(
                f"cannot import {what} module {target!r} ({one_line(exc, typed=True)}); check it "
                "is installed or on PYTHONPATH"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise error(f"{what} factory {attr!r} not found in {target}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} factory {attr!r} in {target} is {type(obj).__name__}, not callable")
    return obj


def _import_file(path: Path, error: type[InputError], what: str) -> Any:
    if not path.is_file():
        raise error(f"{what} file {path} does not exist; check the path in the spec")
    resolved = path.resolve()
    name = "autocompress_user_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise error(f"cannot load {what} file {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered so that tools which look classes up by module (inspect, pickle, tracing)
    # find it; the file's folder is importable while it runs, so sibling imports work.
    sys.modules[name] = module
    sys.path.insert(0, str(resolved.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise error(f"importing {what} file {path} failed: {one_line(exc, typed=True)}") from exc
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a state_dict, or a checkpoint dict holding one.

    Loaded with ``weights_only=True``: a file that needs arbitrary unpickling is refused.
    A leading ``module.`` (DataParallel / DDP) prefix is stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist; check --weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and found:
            raise ModelSpecError(
                f"weights file {path} holds a pickled {found.group(1)}, refused on purpose: "
                "unpickling it could run arbitrary code; re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from exc
        raise ModelSpecError(
            f"weights file {path} is not a PyTorch checkpoint ({type(exc).__name__}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from exc
    state = obj
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        state = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
    if not isinstance(state, dict) or not _is_tensor_dict(state):
        held = f"a {type(obj).__name__}"
        if isinstance(obj, dict):
            held = (
                f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if obj else "an empty dict"
            )
        raise ModelSpecError(
            f"weights file {path} is not a checkpoint: it holds {held}; "
            f"expected a state_dict or a dict with one under {', '.join(CHECKPOINT_KEYS)}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: dict[Any, Any]) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a weights file into ``model`` strictly; any mismatch is a ModelSpecError.

    Only ``num_batches_tracked`` buffers may be absent (older checkpoints lack them and
    they do not change what the model computes).
    """
    state = read_state_dict(weights)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                more = f", +{len(items) - 3} more" if len(items) > 3 else ""
                problems.append(f"{len(items)} {label} ({'; '.join(items[:3])}{more})")
        raise ModelSpecError(
            f"weights {weights} do not fit the model: {', '.join(problems)}; check that --model "
            "and --num-classes match the checkpoint"
        )
    model.load_state_dict(state, strict=False)


def _in_channels(model: nn.Module) -> int:
    """Input channels of the first conv (3 when the model has none)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    return 3


def check_model_input(model: nn.Module, example: torch.Tensor, spec: str) -> int:
    """One eval-mode forward pass; returns the number of output classes."""
    model.eval()
    shape = tuple(example.shape)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # any failure means the shape is not accepted
        raise ModelSpecError(
            f"model {spec!r} rejects input of shape {shape}: {one_line(exc, typed=True)}; pass "
            "--input-size N to feed NxN images (or data with the channel count it expects)"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSpecError(
            f"model {spec!r} returned {got} for input {shape}; it must return logits of "
            "shape (batch, classes): wrap it to return the logits tensor"
        )
    return int(out.shape[1])


# --------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class Task:
    """What the search compresses: the teacher (eval mode, CPU) and the data it is scored on."""

    model: nn.Module
    data: DataSplits
    model_spec: str
    data_spec: str
    input_shape: tuple[int, int, int]
    num_classes: int
    weights: str | None = None


def load_task(
    model_spec: str | None,
    weights: str | None,
    data_spec: str | None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Task:
    """Load model and data; with neither spec, the built-in demo CNN on digits.

    The demo teacher is trained on the train split of this seed's digits split at first
    use and cached; later calls load it.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if data_spec is None:
        if model_spec is not None:
            raise DataSpecError(
                f"--model {model_spec} needs --data too (e.g. --data imagefolder:ROOT); only "
                "the built-in demo runs without both"
            )
        data_spec = DIGITS_DATA_SPEC
    data = load_data(
        data_spec, input_size=input_size, seed=seed, cache_dir=cache, mean=mean, std=std
    )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelSpecError(f"--num-classes must be a positive integer, got {num_classes!r}")
    classes = num_classes if num_classes is not None else data.num_classes
    if classes < data.num_classes:
        raise ModelSpecError(
            f"--num-classes {classes} is less than the {data.num_classes} classes in "
            f"{data.spec!r}; drop --num-classes or match it to the data"
        )
    if model_spec is None or (model_spec == DEMO_MODEL_SPEC and weights is None):
        if data.spec != DIGITS_DATA_SPEC:
            raise ModelSpecError(
                f"the built-in demo model is trained on digits only, not {data.spec!r}; "
                "pass --model (and --weights) for your own model"
            )
        if classes != data.num_classes:
            raise ModelSpecError(
                f"--num-classes {classes} does not fit the built-in demo, trained on "
                f"{data.num_classes} digit classes; drop --num-classes"
            )
        from autocompress.demo import load_demo_model

        model_spec = DEMO_MODEL_SPEC
        model: nn.Module = load_demo_model(data, cache_dir=cache, seed=seed)
        check_model_input(model, data.example_input(), model_spec)
    else:
        model = load_model(model_spec, weights, num_classes=classes, input_shape=data.input_shape)
        # The zero-input check above fixed the shape; one real batch catches dtype surprises.
        check_model_input(model, data.example_input(2), model_spec)
    return Task(
        model=model.eval(),
        data=data,
        model_spec=model_spec,
        data_spec=data.spec,
        input_shape=data.input_shape,
        num_classes=classes,
        weights=str(weights) if weights is not None else None,
    )


def load_for_profile(
    model_spec: str | None,
    weights: str | None,
    data_spec: str | None,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """Model (eval mode) and one example input (batch 1) for ``autocompress profile``.

    Unlike a search, profiling needs no data: the input shape comes from ``input_shape``
    (C, H, W), else from the data when given, else from the model (first conv's channels,
    ``input_size`` or 224 square). No model and no data: the built-in demo.
    """
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ModelSpecError(
                f"--input-shape must be C,H,W (three positive integers), got {shape}"
            )
    demo = model_spec in (None, DEMO_MODEL_SPEC) and weights is None
    if data_spec is not None or (demo and input_shape is None):
        task = load_task(
            model_spec if data_spec is not None else None,
            weights,
            data_spec,
            num_classes=num_classes,
            input_size=input_size,
            seed=seed,
            cache_dir=cache_dir,
        )
        if input_shape is not None and tuple(input_shape) != task.input_shape:
            raise ModelSpecError(
                f"--input-shape {tuple(input_shape)} differs from the data's {task.input_shape}; "
                "drop --input-shape or use --input-size to resize the data"
            )
        return task.model, task.data.example_input(1)
    if model_spec is None:
        model_spec = DEMO_MODEL_SPEC  # an untrained demo: the shape alone is being profiled
    if input_shape is not None:
        model = load_model(model_spec, weights, num_classes=num_classes, input_shape=shape)
    else:
        side = input_size or 224
        model = load_model(model_spec, weights, num_classes=num_classes, input_size=side)
        shape = (_in_channels(model), side, side)
    # Values do not change FLOPs or latency; a seeded random input avoids all-zero fast paths.
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    return model, example
