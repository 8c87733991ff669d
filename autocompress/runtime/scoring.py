"""What an exported file computes on a target: its outputs, top-1 predictions and the task's
score on labelled batches, measured on the file the user will get (design rule 1)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from autocompress.errors import InputError
from autocompress.intake.metric import TOP1, Metric
from autocompress.runtime.sessions import DEFAULT_TARGET, DEFAULT_THREADS, input_name, make_session


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    # token ids stay integers (int64, as exported); everything else is float32
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
        return np.ascontiguousarray(x, dtype=np.int64)
    return np.ascontiguousarray(x, dtype=np.float32)


def split_batch(batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Accept ``x`` or ``(x, y)`` batches (tensors or arrays): the runtime's input and the
    labels (None when the batch has none)."""
    if isinstance(batch, (tuple, list)):
        x = _as_numpy(batch[0])
        y = None if len(batch) < 2 else np.asarray(_labels(batch[1]))
        return x, y
    return _as_numpy(batch), None


def _labels(y: Any) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y)


def predictions(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> np.ndarray:
    """Top-1 class of every sample (argmax of the first output over dimension 1; per
    position for per-pixel logits), batches in order."""
    out = raw_outputs(path, batches, threads=threads, session_options=session_options,
                      target=target)
    if out.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    return out.argmax(axis=1).astype(np.int64)


def raw_outputs(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> np.ndarray:
    """The first output of the file for every sample, batches in order (N, ...)."""
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    name = input_name(session)
    out = [np.asarray(session.run(None, {name: split_batch(batch)[0]})[0]) for batch in batches]
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)


def onnx_accuracy(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
    metric: Metric | None = None,
) -> float:
    """The task's figure for the ONNX file on ``(x, y)`` batches: top-1 accuracy in [0, 1]
    unless ``metric`` says otherwise (then its higher-is-better score)."""
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    name = input_name(session)

    def scored() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for batch in batches:
            x, y = split_batch(batch)
            if y is None:
                raise InputError("onnx_accuracy needs (x, y) batches; got inputs without labels")
            yield np.asarray(session.run(None, {name: x})[0]), y

    return (metric or TOP1).score_batches(scored())
