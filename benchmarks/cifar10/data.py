"""CIFAR-10 on disk in the ImageFolder layout, and a tiny subset factory for latency runs.

Self-contained (no package-relative imports): ``latency_subset`` is loaded by autocompress's
intake as a data factory from this file's path (``.../data.py:latency_subset``).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
DEFAULT_ROOT = Path("~/.cache/cifar10").expanduser()
ROOT_ENV = "AUTOCOMPRESS_BENCH_CIFAR_ROOT"
# ../shared/datasets relative to the repository root (benchmarks/cifar10/data.py -> repo).
ARCHIVE = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
# Per-class counts of the latency scenario's subset (stored at 32x32, resized at preprocess).
SUBSET_PER_CLASS = {"train": 4, "val": 2, "test": 2}


def root() -> Path:
    return Path(os.environ.get(ROOT_ENV, str(DEFAULT_ROOT))).expanduser()


def _complete(folder: Path) -> bool:
    return all((folder / split / c).is_dir() for split in ("train", "test") for c in CLASSES)


def ensure_cifar(folder: Path | None = None) -> str:
    """Make ``folder``/train and /test exist; returns how (present, unpacked, downloaded)."""
    folder = folder or root()
    if _complete(folder):
        return f"present in {folder}"
    folder.mkdir(parents=True, exist_ok=True)
    if ARCHIVE.is_file():
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(folder, filter="data")
        if _complete(folder):
            return f"unpacked {ARCHIVE} into {folder}"
    _download(folder)
    return f"downloaded with torchvision into {folder}"


def _download(folder: Path) -> None:
    """torchvision's CIFAR-10 (pickled arrays) written out as PNG files in ImageFolder layout."""
    from PIL import Image
    from torchvision.datasets import CIFAR10

    raw = folder / "_torchvision"
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(raw), train=train, download=True)
        counts = dict.fromkeys(range(10), 0)
        for image, label in zip(ds.data, ds.targets, strict=True):
            target = folder / split / ds.classes[label]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / f"{counts[label]:04d}.png")
            counts[label] += 1


def _read(paths: list[tuple[Path, int]]) -> list[tuple[torch.Tensor, int]]:
    from PIL import Image

    out = []
    for path, label in paths:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
        out.append((torch.from_numpy(arr), label))
    return out


def latency_subset() -> dict[str, list[tuple[torch.Tensor, int]]]:
    """A few real CIFAR-10 images per class (32x32 uint8): enough to calibrate, fine-tune a
    few steps and score a 224x224 model whose latency, not accuracy, is under study.

    val and test come from the official test folder (disjoint files), train from train.
    """
    base = root()
    parts: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        train_files = sorted((base / "train" / name).iterdir())
        test_files = sorted((base / "test" / name).iterdir())
        n_val, n_test = SUBSET_PER_CLASS["val"], SUBSET_PER_CLASS["test"]
        parts["train"] += [(p, label) for p in train_files[: SUBSET_PER_CLASS["train"]]]
        parts["val"] += [(p, label) for p in test_files[:n_val]]
        parts["test"] += [(p, label) for p in test_files[n_val : n_val + n_test]]
    return {name: _read(files) for name, files in parts.items()}
