"""A retrain's cost from its parent's fine-tune, phase by phase (search/retrain_cost.py)."""

from __future__ import annotations

import json

import pytest

from autocompress.search.retrain_cost import phase_paces, recovery_over_qat, retrain_timing
from autocompress.study.records import TrialRecord


def _rec(finetune: float, ran: int, recovery_steps: int = 0,
         recovery_seconds: float | None = None) -> TrialRecord:
    attrs: dict[str, object] = {"timing": json.dumps({"build": 1.0, "finetune": finetune,
                                                      "measure": 5.0}),
                                "finetune_steps_run": ran}
    if recovery_steps:
        attrs["recovery_steps"] = recovery_steps
    if recovery_seconds is not None:
        attrs["recovery_seconds"] = recovery_seconds
    return TrialRecord(number=1, state="COMPLETE", accuracy=0.8, size_bytes=100.0,
                       latency_ms=1.0, feasible=True, plan={"finetune_steps": ran}, attrs=attrs)


# The budget run's parent: 112 BatchNorm-live steps at 0.16 s, 38 int8 QAT steps at 0.474 s.
PARENT = _rec(112 * 0.16 + 38 * 0.474, 150, 112, 112 * 0.16)


def test_each_phase_is_priced_at_its_own_pace() -> None:
    recovery, qat = phase_paces(PARENT)
    assert recovery == pytest.approx(0.16) and qat == pytest.approx(0.474)


def test_an_all_qat_retrain_of_a_mostly_recovered_parent_is_costed_at_qat_pace() -> None:
    """The overrun it fixes: a 2,325-step retrain that inherits (all QAT) costed at the
    parent's mean step (0.24 s) was planned for 9.3 minutes and ran 18.4."""
    timing, steps = retrain_timing(PARENT, 2325, recovers=False, ratio=1.0) or ({}, 0)
    assert steps == 2325
    assert timing["finetune"] == pytest.approx(2325 * 0.474)
    assert timing["build"] == 1.0 and timing["measure"] == 5.0  # the fixed part unchanged
    teacher, _ = retrain_timing(PARENT, 2325, recovers=True, ratio=1.0) or ({}, 0)
    assert teacher["finetune"] == pytest.approx(2325 * (0.75 * 0.16 + 0.25 * 0.474))


def test_a_phase_the_parent_did_not_run_is_priced_by_the_studys_ratio() -> None:
    inherited = _rec(150 * 0.474, 150)  # all QAT: no recovery pace of its own
    assert phase_paces(inherited) == (None, pytest.approx(0.474))
    ratio = recovery_over_qat([PARENT, inherited])
    assert ratio == pytest.approx(0.16 / 0.474)
    timing, _ = retrain_timing(inherited, 600, recovers=True, ratio=ratio) or ({}, 0)
    assert timing["finetune"] == pytest.approx(600 * (0.75 * 0.16 + 0.25 * 0.474))
    assert recovery_over_qat([inherited]) == 1.0  # nothing to go by: the same pace


def test_records_without_split_timing_or_any_fine_tune() -> None:
    old = _rec(150 * 0.3, 150, 112)  # recorded before the phases were timed apart
    assert phase_paces(old) == (pytest.approx(0.3), pytest.approx(0.3))
    assert retrain_timing(_rec(0.0, 0), 600, recovers=True, ratio=1.0) is None
