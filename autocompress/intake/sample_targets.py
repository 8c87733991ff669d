"""What a dataset's samples are scored against: class labels, or any tensor the task's metric
reads (regression values, per-pixel masks, several values per sample).

Data factories and tasks scored by top-1 accuracy yield class labels (ints >= 0, stored as
(N,) int64; whole floats are read as ints, as before). A task with its own metric may yield
any numeric target: ints stay int64, floats become float32, each sample's target keeps its
shape, stacked to (N, *shape). The dtype then says how the model's outputs are read:
integer targets are class indices (its outputs are logits over dim 1: cross-entropy,
softmax distillation), float targets are values (mean squared error, output matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from autocompress.errors import DataSpecError

CLASSES = "classes"  # targets must be class labels (top-1 tasks, data factories)
ANY = "any"  # a task with its own metric: any numeric target


def read_target(label: Any, *, mode: str, where: str) -> int | torch.Tensor:
    """One sample's target: an int class label (``CLASSES``) or a tensor (``ANY``).
    ``where`` names the sample in errors ("train sample 3 of 'task:f.py:make'")."""
    if mode == CLASSES:
        return _class_label(label, where)
    if isinstance(label, bool) or isinstance(label, np.bool_):
        raise DataSpecError(f"{where} has target {label!r}; targets must be numbers or "
                            "numeric tensors, not booleans")
    if isinstance(label, (int, np.integer)):
        return torch.tensor(int(label), dtype=torch.int64)
    if isinstance(label, (float, np.floating)):
        return torch.tensor(float(label), dtype=torch.float32)
    if isinstance(label, np.ndarray):
        if not (np.issubdtype(label.dtype, np.number) or label.dtype == np.bool_):
            raise DataSpecError(f"{where} has target {_short(label)} of {label.dtype}; "
                                "targets must be numbers or numeric tensors")
        label = torch.from_numpy(np.ascontiguousarray(label))
    if isinstance(label, (list, tuple)):
        try:
            label = torch.as_tensor(label)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataSpecError(f"{where} has target {_short(label)}; targets must be numbers "
                                "or numeric tensors") from exc
    if not isinstance(label, torch.Tensor) or label.dtype == torch.bool or label.is_complex():
        raise DataSpecError(f"{where} has target {_short(label)}; targets must be numbers or "
                            "numeric tensors")
    return label.to(torch.float32 if label.is_floating_point() else torch.int64)


def stack_targets(targets: Sequence[int | torch.Tensor], where: str) -> torch.Tensor:
    """(N,) int64 class labels, or (N, *shape) int64 / float32 targets of one shape (float32
    as soon as one sample's is float)."""
    if all(isinstance(t, int) for t in targets):
        return torch.tensor(list(targets), dtype=torch.int64)
    tensors = [t if isinstance(t, torch.Tensor) else torch.tensor(t) for t in targets]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataSpecError(f"{where} targets differ in shape ({len(shapes)} shapes, e.g. "
                            f"{sorted(shapes)[:2]}); every sample's target needs one shape")
    dtype = torch.float32 if any(t.is_floating_point() for t in tensors) else torch.int64
    return torch.stack([t.to(dtype) for t in tensors]).contiguous()


def are_class_labels(y: torch.Tensor) -> bool:
    """One integer per sample: labels that can be stratified and counted as classes."""
    return y.ndim == 1 and not y.is_floating_point()


def are_values(y: torch.Tensor) -> bool:
    """Float targets: the model's outputs are values, not logits."""
    return bool(y.is_floating_point())


def _class_label(label: Any, where: str) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    elif isinstance(label, np.ndarray) and label.size == 1:
        label = label.reshape(()).item()
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or label < 0:
        raise DataSpecError(f"{where} has label {_short(label)}; labels must be ints >= 0 "
                            "(a task with its own metric may yield any numeric target)")
    return int(label)


def _short(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} {tuple(shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["ANY", "CLASSES", "are_class_labels", "are_values", "read_target", "stack_targets"]
