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

The package by job: ``specs`` (spec forms, factories, cache folder), ``data`` (splits and
preprocessing), ``data_loading`` (a data spec into splits), ``splitting`` (seeded, stratified
positions), ``data_sources`` (digits, image folders, CIFAR-10, factories), ``models`` (model
specs and weights) and ``task`` (the two together).

Layer 2. May import: ``errors``, ``config``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so that a
# torch-free reader of one intake module (``intake.metric`` for ``show`` and ``list``) does
# not load torch through this package.
_EXPORTS = {
    "DataSplits": "data", "Split": "data", "as_sequences": "data",
    "load_data": "data_loading",
    "check_model_input": "models", "load_model": "models", "load_weights": "models",
    "read_state_dict": "models",
    "DEMO_MODEL_SPEC": "specs", "DIGITS_DATA_SPEC": "specs", "IMAGE_EXTENSIONS": "specs",
    "SPLIT_NAMES": "specs", "default_cache_dir": "specs",
    "Task": "task", "load_for_profile": "task", "load_task": "task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autocompress.intake' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"autocompress.intake.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
