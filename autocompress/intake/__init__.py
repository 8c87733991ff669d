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

from autocompress.intake.data import (
    DataSplits,
    Split,
    as_sequences,
)
from autocompress.intake.data_loading import load_data
from autocompress.intake.models import (
    check_model_input,
    load_model,
    load_weights,
    read_state_dict,
)
from autocompress.intake.specs import (
    DEMO_MODEL_SPEC,
    DIGITS_DATA_SPEC,
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    default_cache_dir,
)
from autocompress.intake.task import (
    Task,
    load_for_profile,
    load_task,
)

__all__ = [
    "DEMO_MODEL_SPEC",
    "DIGITS_DATA_SPEC",
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "DataSplits",
    "Split",
    "Task",
    "as_sequences",
    "check_model_input",
    "default_cache_dir",
    "load_data",
    "load_for_profile",
    "load_model",
    "load_task",
    "load_weights",
    "read_state_dict",
]
