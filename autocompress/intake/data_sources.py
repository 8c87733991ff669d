"""Where data comes from: digits, image folders (decoded once, cached), CIFAR-10, factories."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from autocompress.errors import DataSpecError, one_line
from autocompress.intake.sample_inputs import InputLayout, pack, single_input, stack_inputs
from autocompress.intake.sample_targets import CLASSES, are_class_labels, read_target, stack_targets
from autocompress.intake.specs import _IMAGE_CACHE_VERSION, IMAGE_EXTENSIONS, _resolve_factory


@dataclass(eq=False)  # tensors inside: == would be ambiguous
class _Source:
    """A loaded but unsplit part of a data set (e.g. the train folder)."""

    x: torch.Tensor
    y: torch.Tensor


def _load_digits() -> tuple[_Source, list[str], float]:
    from sklearn.datasets import load_digits  # lazy: only the digits spec needs sklearn

    digits = load_digits()
    # 8x8 images with integer values 0..16: stored as uint8, scaled by 16 at preprocessing.
    x = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return _Source(x, y), [str(c) for c in digits.target_names], 16.0


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


def _load_cifar10(root_text: str) -> tuple[_Source, _Source, list[str]]:
    if not root_text:
        raise DataSpecError("cifar10 spec needs a download folder: use cifar10:ROOT")
    from torchvision.datasets import CIFAR10

    root = Path(root_text).expanduser()
    if root.exists() and not root.is_dir():
        raise DataSpecError(f"cifar10 folder {root} is a file; use cifar10:ROOT with ROOT a "
                            "folder (a new one, or one holding cifar-10-batches-py)")
    made, before = _first_missing(root), _entries(root)
    try:
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except Exception as exc:  # URLError, checksum errors, HTTP errors...
        _remove_new(root, made, before)  # no half-downloaded archive or folder left behind
        raise DataSpecError(
            f"could not download CIFAR-10 into {root} ({one_line(exc, typed=True)}); without "
            "network, use cifar10:DIR with DIR a folder holding a local cifar-10-batches-py "
            "(the python version), or unpack images as ROOT/train/<class>/*.png and "
            "ROOT/test/<class>/*.png and use --data imagefolder:ROOT"
        ) from exc

    def source(ds: Any) -> _Source:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC->NCHW
        return _Source(x, torch.as_tensor(ds.targets, dtype=torch.int64))

    return source(train), source(test), list(train.classes)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: it exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _remove_new(root: Path, made: Path | None, before: set[str]) -> None:
    """Undo a failed download: the folders it made, else the entries it added to ``root``."""
    import shutil

    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for name in _entries(root) - before:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _load_data_factory(spec: str) -> tuple[_Source, _Source | None, _Source, list[str]]:
    factory = _resolve_factory(spec, DataSpecError, "data")
    try:
        result = factory()
    except Exception as exc:  # user code: report, do not crash
        raise DataSpecError(
            f"data factory {spec!r} raised {one_line(exc, typed=True)}; fix the factory"
        ) from exc
    return _sources_from_result(result, spec)


def _sources_from_result(
    result: Any, spec: str, targets: str = CLASSES, layout: InputLayout | None = None
) -> tuple[_Source, _Source | None, _Source, list[str]]:
    """A data factory's (or a task's) datasets read into stored train / val / test, with the
    class names (none when the targets are not class labels)."""
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
    sources = {name: _materialize(ds, spec, name, targets, layout)
               for name, ds in parts.items()}
    shapes = {tuple(s.x.shape[1:]) for s in sources.values()}
    if len(shapes) > 1:
        raise DataSpecError(
            f"data factory {spec!r} yields inputs of different shapes {sorted(shapes)} across "
            "train/test; yield one shape in every dataset (resize images, pad token ids)"
        )
    if len({s.x.dtype for s in sources.values()}) > 1:
        raise DataSpecError(
            f"data factory {spec!r} yields inputs of different dtypes across datasets "
            f"({sorted(str(s.x.dtype) for s in sources.values())}); use one dtype"
        )
    kinds = {(tuple(s.y.shape[1:]), s.y.dtype) for s in sources.values()}
    if len(kinds) > 1:
        raise DataSpecError(
            f"data factory {spec!r} yields targets of different shapes or types across "
            f"train/test ({sorted(str(k) for k in kinds)}); yield one kind of target"
        )
    if not are_class_labels(sources["train"].y):
        return sources["train"], sources.get("val"), sources["test"], []
    num_labels = int(max(int(s.y.max()) for s in sources.values())) + 1
    names = getattr(parts["train"], "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= num_labels:
        classes = [str(c) for c in names]
    else:
        classes = [str(i) for i in range(num_labels)]
    if len(classes) < 2 and targets == CLASSES:
        raise DataSpecError(
            f"data factory {spec!r} yields only one class; classification needs at least 2"
        )
    return sources["train"], sources.get("val"), sources["test"], classes


def samples_of(data: Any) -> Any:
    """A DataLoader's dataset (its samples, read one by one; batching is ours), else
    ``data`` itself."""
    return data.dataset if isinstance(data, DataLoader) else data


def _materialize(dataset: Any, spec: str, name: str, targets: str = CLASSES,
                 layout: InputLayout | None = None) -> _Source:
    """Read a whole (inputs, target) dataset into stacked tensors (``targets``: what a
    target may be, see ``intake.sample_targets``; ``layout``: how a task's several input
    tensors are packed into one, see ``intake.sample_inputs``)."""
    dataset = samples_of(dataset)
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
    what = "int label" if targets == CLASSES else "target"
    inputs, labels = [], []
    for i, item in enumerate(items):
        where = f"{name} sample {i} of {spec!r}"
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataSpecError(
                f"{where} is {type(item).__name__}; datasets must yield (inputs, {what}), "
                "inputs an image tensor (C, H, W), a vector, or a tuple or dict of tensors"
            )
        sample, label = item[0], item[1]
        if layout is not None:
            inputs.append(pack(sample, layout, where))
        elif isinstance(sample, (Mapping, tuple, list)):
            raise DataSpecError(
                f"{where} yields a {type(sample).__name__} of inputs; tuple and dict inputs "
                "need a task (--task file.py:factory) whose model takes them"
            )
        else:
            inputs.append(single_input(sample, where))
        labels.append(read_target(label, mode=targets, where=where))
    x = stack_inputs(inputs, f"the {name} dataset of {spec!r}")
    return _Source(x, stack_targets(labels, f"the {name} dataset of {spec!r}"))
