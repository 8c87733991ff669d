"""The figure a search maximises: top-1 accuracy, or the user's own metric.

A metric sees every prediction of a split at once: ``fn(outputs, targets) -> float`` with
``outputs`` the model's stacked output array (N, ...) and ``targets`` the stacked targets.
Internally every figure is "higher is better": a metric that is better when lower (an
error) is recorded negated and labelled ``neg_<name>``, the convention scikit-learn's
scorers use, so fronts, budgets on accuracy drop and hypervolume need no second code path.
Torch-free: the dashboard and the report read the label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autocompress.errors import InputError, one_line

TOP1_NAME = "accuracy"


class MetricError(InputError):
    """The user's metric failed or returned something that is not a finite number."""


@dataclass(frozen=True)
class Metric:
    """How a split is scored. ``fn`` None means top-1 accuracy of (N, classes) logits."""

    name: str = TOP1_NAME
    higher_is_better: bool = True
    fn: Callable[[np.ndarray, np.ndarray], Any] | None = None

    @property
    def label(self) -> str:
        """The name of the recorded (higher-is-better) figure."""
        return self.name if self.higher_is_better else f"neg_{self.name}"

    @property
    def is_top1(self) -> bool:
        return self.fn is None

    def value(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        """The metric as the user defined it (not negated)."""
        if self.fn is None:
            if outputs.shape[0] == 0:
                raise InputError("no samples to score; check the split is not empty")
            return float((outputs.argmax(axis=1) == targets.reshape(-1)).mean())
        try:
            result = self.fn(outputs, targets)
        except Exception as exc:  # user code: one line, the caller decides fail or exit
            raise MetricError(f"metric {self.name!r} raised {one_line(exc, typed=True)}; "
                              "fix the task's metric") from exc
        if isinstance(result, np.generic) or (isinstance(result, np.ndarray)
                                              and result.shape == ()):
            result = result.item()
        if isinstance(result, bool) or not isinstance(result, (int, float)):
            raise MetricError(f"metric {self.name!r} returned {type(result).__name__}, not a "
                              "float; return one number for the whole split")
        if not math.isfinite(result):
            raise MetricError(f"metric {self.name!r} returned {result} on "
                              f"{outputs.shape[0]} samples; it must be a finite number")
        return float(result)

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        """The recorded figure: the value, negated when lower is better."""
        value = self.value(outputs, targets)
        return value if self.higher_is_better else -value

    def score_batches(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        """Score (outputs, targets) pairs of a split, batch by batch in order."""
        if self.fn is None:  # top-1 is counted batch by batch: no copy of every output
            correct = total = 0
            for out, y in pairs:
                correct += int((np.asarray(out).argmax(axis=1) == np.asarray(y).reshape(-1)).sum())
                total += int(np.asarray(y).size)
            if total == 0:
                raise InputError("no samples to score; check the split is not empty")
            return correct / total
        outs, ys = [], []
        for out, y in pairs:
            outs.append(np.asarray(out))
            ys.append(np.asarray(y))
        if not outs:
            raise InputError("no samples to score; check the split is not empty")
        return self.score(np.concatenate(outs), np.concatenate(ys))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label,
                "higher_is_better": self.higher_is_better, "custom": self.fn is not None}


TOP1 = Metric()


def label_of(recorded: Any) -> str:
    """The figure's label from a study's recorded ``metric`` attribute (absent: accuracy)."""
    if isinstance(recorded, dict) and recorded.get("label"):
        return str(recorded["label"])
    return TOP1_NAME
