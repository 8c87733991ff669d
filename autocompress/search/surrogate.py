"""The study's accuracy surrogate: a plan's accuracy predicted from its sensitivity damage,
calibrated on the trials this study has measured.

Damage is the sensitivity table's sum of single-choice KL scores (``guided``), a number with
no unit of its own; what a unit of it costs in accuracy after a fine-tune is learned here, on
this study: every fine-tuned trial gives one pair (damage added, accuracy lost), measured from
where its fine-tune started, the teacher (fp32 accuracy, damage 0) or the trial it inherited
from (its accuracy and damage). The slope is the least-squares fit through the origin; the
spread, the residuals' root mean square, says how far to trust a prediction. Until
``MIN_PAIRS`` pairs exist the spread is ``PRIOR_SPREAD`` (wide: nothing is refused on a guess).

A plan whose predicted accuracy, even ``spread`` higher, is below what the measured front
already reaches at its size is *predicted dominated*: the search does not fine-tune it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_PAIRS = 3
PRIOR_SPREAD = 0.05  # before calibration: five points either way
MIN_SPREAD = 0.004  # a fine-tune's run-to-run noise on a few thousand validation images


@dataclass(frozen=True)
class Pair:
    """One fine-tuned trial: damage added over its starting point, accuracy lost."""

    damage: float
    lost: float


@dataclass(frozen=True)
class Surrogate:
    fp32_accuracy: float
    slope: float  # accuracy lost per unit of damage
    spread: float  # residual root mean square
    pairs: int

    def predict(self, damage: float, *, start_accuracy: float | None = None,
                start_damage: float = 0.0) -> float:
        """Accuracy after a fine-tune from ``start_accuracy`` (None: the teacher's) at
        ``start_damage``; never above the teacher's or the start's, whichever is higher (a
        fine-tune can end above the teacher on a small validation split)."""
        base = self.fp32_accuracy if start_accuracy is None else start_accuracy
        return min(max(self.fp32_accuracy, base), base - self.slope * (damage - start_damage))

    def dominated(self, predicted: float, size: float,
                  measured: Sequence[tuple[float, float]]) -> bool:
        """Whether ``predicted`` (+ spread) at ``size`` is below a measured (size, accuracy)
        point that is no larger."""
        reached = front_accuracy_at(size, measured)
        return reached is not None and predicted + self.spread < reached


def front_accuracy_at(size: float, measured: Sequence[tuple[float, float]]) -> float | None:
    """The best accuracy measured at ``size`` bytes or fewer (None: nothing that small)."""
    return max((acc for s, acc in measured if s <= size), default=None)


def calibrate(pairs: Sequence[Pair], fp32_accuracy: float) -> Surrogate:
    """The slope and spread from the study's pairs (module docstring)."""
    usable = [p for p in pairs if p.damage > 1e-12 and math.isfinite(p.lost)]
    if not usable:
        return Surrogate(fp32_accuracy, 0.0, PRIOR_SPREAD, 0)
    slope = max(0.0, sum(p.damage * p.lost for p in usable) / sum(p.damage ** 2
                                                                    for p in usable))
    if len(usable) < MIN_PAIRS:
        return Surrogate(fp32_accuracy, slope, PRIOR_SPREAD, len(usable))
    residual = math.sqrt(sum((p.lost - slope * p.damage) ** 2 for p in usable) / len(usable))
    return Surrogate(fp32_accuracy, slope, max(MIN_SPREAD, residual), len(usable))


__all__ = ["MIN_PAIRS", "Pair", "Surrogate", "calibrate", "front_accuracy_at"]
