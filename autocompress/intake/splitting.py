"""Seeded splits by position: stratified by class for class labels (every part holds about
its fraction of each class), a seeded random split for other targets. Every part comes back
in a seeded random order, never by index: ImageFolder lists samples class by class, so a
tail slice would hold a single class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from autocompress.intake.sample_targets import are_class_labels


def split_positions(
    y: torch.Tensor, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Stratified by class for class labels; a seeded random split of other targets (each
    part after the first gets at least one sample when there are enough)."""
    if are_class_labels(y):
        return stratified_split(y.numpy(), fractions, rng)
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


def stratified_split(
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
