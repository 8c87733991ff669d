"""Spec forms and defaults, factory resolution and the cache folder (data and model intake)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocompress.errors import InputError, one_line

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
    "torchvision:NAME, timm:NAME, hf:MODEL_DIR, path/to/file.py:factory, "
    "package.module:factory or demo"
)


_DATA_FORMS = ("digits, imagefolder:ROOT, cifar10:ROOT, text:FILE.csv (or .jsonl) or "
               "package.module:factory")


def default_cache_dir() -> Path:
    """``$AUTOCOMPRESS_CACHE`` or ``~/.cache/autocompress``."""
    env = os.environ.get("AUTOCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autocompress"


def _is_factory_target(spec: str) -> bool:
    target, _, attr = spec.rpartition(":")
    return (
        bool(target)
        and bool(_DOTTED.match(attr))
        and (target.endswith(".py") or bool(_DOTTED.match(target)))
    )


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
