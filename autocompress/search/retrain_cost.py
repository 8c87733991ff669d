"""What a retrain (a promotion) of a trial's plan will cost, phase by phase.

A pruning plan's fine-tune runs two kinds of step at different costs: with BatchNorm live
(recovery, float) and QAT. On ResNet-20 an int8 QAT step cost 0.47 s where a BatchNorm-live
step cost 0.16 s, while a weight-only QAT step cost 0.23 s against 0.27 s. A retrain costed
at its parent's mean step, when the two mixed the phases differently, overran a 15-minute
search by 8.6 minutes: the parent ran 3/4 of its 150 steps BatchNorm-live, the retrain all
2,325 as int8 QAT. Each phase is now costed at the pace the parent measured for it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def phase_paces(record: TrialRecord) -> tuple[float | None, float | None]:
    """Seconds per step of ``record``'s fine-tune with BatchNorm live and in QAT; None for a
    phase it did not run (or a trial recorded before the phases were timed apart: then
    both are its mean step)."""
    timing = record.json_attr(trial_attrs.TIMING) or {}
    total = timing.get("finetune")
    ran = int(record.attrs.get(trial_attrs.FINETUNE_STEPS_RUN) or 0)
    if not total or ran <= 0:
        return None, None
    recovery = int(record.attrs.get(trial_attrs.RECOVERY_STEPS) or 0)
    seconds = record.attrs.get(trial_attrs.RECOVERY_SECONDS)
    if recovery and seconds is None:
        return total / ran, total / ran
    spent = float(seconds or 0.0)
    # QAT's share carries the fine-tune's other work too (folding, building the QAT model)
    qat = (total - spent) / (ran - recovery) if ran > recovery else None
    return (spent / recovery if recovery else None), qat


def recovery_over_qat(records: Sequence[TrialRecord]) -> float:
    """The study's median ratio of a BatchNorm-live step's cost to a QAT step's, over the
    trials that ran both (1.0 when none did): it prices the phase a parent did not run."""
    ratios = [f / q for f, q in map(phase_paces, records) if f and q]
    return statistics.median(ratios) if ratios else 1.0


def retrain_timing(record: TrialRecord, steps: int, *, recovers: bool,
                   ratio: float) -> tuple[dict[str, float], int] | None:
    """``record``'s timing with its fine-tune re-costed for a retrain of ``steps`` steps that
    runs the recovery phase (``recovers``: from the teacher, 3/4 BatchNorm-live) or not, and
    the steps it is costed for; None when the record timed no fine-tune. ``ratio``:
    ``recovery_over_qat``, for the phase the record did not run."""
    recovery, qat = phase_paces(record)
    if recovery is None and qat is None:
        return None
    from autocompress.train.tuning import RECOVERY_SHARE  # torch: costing a retrain only

    if qat is None:
        qat = recovery / ratio  # type: ignore[operator]
    if recovery is None:
        recovery = qat * ratio
    share = RECOVERY_SHARE if recovers else 0.0
    pace = share * recovery + (1.0 - share) * qat
    timing = record.json_attr(trial_attrs.TIMING) or {}
    return {**timing, "finetune": pace * steps}, steps


__all__ = ["phase_paces", "recovery_over_qat", "retrain_timing"]
