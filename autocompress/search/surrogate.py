"""The study's accuracy surrogate: a plan's accuracy predicted from its sensitivity damage,
calibrated on the trials this study has measured.

Damage is the sensitivity table's sum of single-choice KL scores (``guided``), a number with
no unit of its own; what it costs in accuracy after a fine-tune is learned here, on this
study: every fine-tuned trial gives one pair (damage added, accuracy lost), measured from where
its fine-tune started, the teacher (fp32 accuracy, damage 0) or the trial it inherited from
(its accuracy and damage). The loss is modelled as a power law, ``lost = scale x damage **
power``, fitted by least squares on the logarithms of the pairs that lost more than ``NOISE``,
the power kept within ``POWER_RANGE``: a fine-tune repairs small damage almost fully and large
damage hardly at all (ResNet-20: the guided 8x plan, damage 0.10, lost 0.7 points; the 12x
one cut from the teacher, damage 0.49, lost 10), so one straight line through both would
price every small step like the catastrophic cut and steer the search away from the gradual
path. With one pair the power is 1. The spread, the residuals' root mean square in accuracy,
says how far to trust a prediction; until ``MIN_PAIRS`` pairs exist it is ``PRIOR_SPREAD``
(wide: nothing is refused on a guess).

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
NOISE = 0.002  # losses up to this are noise: they do not shape the law
POWER_RANGE = (1.0, 3.0)


@dataclass(frozen=True)
class Pair:
    """One fine-tuned trial: damage added over its starting point, accuracy lost."""

    damage: float
    lost: float


@dataclass(frozen=True)
class Surrogate:
    fp32_accuracy: float
    scale: float  # accuracy lost at damage 1
    spread: float  # residual root mean square, in accuracy
    pairs: int
    power: float = 1.0

    def lost(self, damage: float) -> float:
        return self.scale * max(damage, 0.0) ** self.power

    def predict(self, damage: float, *, start_accuracy: float | None = None,
                start_damage: float = 0.0) -> float:
        """Accuracy after a fine-tune from ``start_accuracy`` (None: the teacher's) at
        ``start_damage``: the start's minus what the damage added costs (a plan that removes
        damage is credited the same way); never above the teacher's or the start's, whichever
        is higher (a fine-tune can end above the teacher on a small validation split)."""
        base = self.fp32_accuracy if start_accuracy is None else start_accuracy
        added = damage - start_damage
        change = -self.lost(added) if added >= 0 else self.lost(-added)
        return min(max(self.fp32_accuracy, base), base + change)

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
    """The power law and spread from the study's pairs (module docstring). Only pairs that
    lost more than ``NOISE`` shape the law: a fine-tune that lost nothing at a tiny damage
    says only that small damage is cheap, and fitted as a loss of ``NOISE`` it made tiny
    damages look expensive per unit (ResNet-20: 0.0002 damage, no loss, priced the whole
    study's moves at 0.7 points per 0.01 of damage). All pairs count for the spread."""
    usable = [p for p in pairs if p.damage > 1e-12 and math.isfinite(p.lost)]
    shaping = [p for p in usable if p.lost > NOISE]
    if not shaping:
        return Surrogate(fp32_accuracy, 0.0,
                         PRIOR_SPREAD if len(usable) < MIN_PAIRS else MIN_SPREAD, len(usable))
    xs = [math.log(p.damage) for p in shaping]
    ys = [math.log(p.lost) for p in shaping]
    power = 1.0
    if len(shaping) >= 2 and max(xs) - min(xs) > 1e-9:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        power = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs)
        power = min(POWER_RANGE[1], max(POWER_RANGE[0], power))
    scale = math.exp(sum(y - power * x for x, y in zip(xs, ys, strict=True)) / len(xs))
    model = Surrogate(fp32_accuracy, scale, PRIOR_SPREAD, len(usable), power)
    if len(usable) < MIN_PAIRS:
        return model
    residual = math.sqrt(sum((p.lost - model.lost(p.damage)) ** 2 for p in usable)
                         / len(usable))
    return Surrogate(fp32_accuracy, scale, max(MIN_SPREAD, residual), len(usable), power)

__all__ = ["MIN_PAIRS", "NOISE", "POWER_RANGE", "Pair", "Surrogate", "calibrate",
           "front_accuracy_at"]
