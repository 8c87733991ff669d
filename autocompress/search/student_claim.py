"""A ``--student``'s distillation once per study, even when several workers start on a new
study at the same moment.

The check "no distillation of this student yet" and the distillation itself run under the
study's lock (``study.study_lock``, a PostgreSQL advisory lock; SQLite admits one worker),
so a second worker starting meanwhile waits at the lock and then finds the record. A worker
that finds a distillation of the student already running elsewhere (or whose queued
distillation trial another worker picked up: Optuna hands queued trials to whichever worker
asks first) does not distil again: it polls the study for that trial's record, for at most
``wait_s`` seconds, and stops with one line when none comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState

from autocompress import study as study_mod
from autocompress.errors import StudyError, TrainingError
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord

# How often a waiting worker reads the study, and how long it waits at most without a time
# limit (a distillation is whole epochs of the student: minutes on CIFAR-10 on a few cores).
POLL_S = 2.0
WAIT_S = 3600.0


def measured(study: Any, spec: str) -> TrialRecord | None:
    """The study's measured distillation trial of ``spec`` (the first: the one every later
    student trial is compressed from), or None."""
    for r in study_mod.records(study):
        if r.attrs.get(trial_attrs.STUDENT_DISTILLED) == spec and r.measured:
            return r
    return None


def pending(study: Any, spec: str, *, queued: bool = True) -> list[int]:
    """Numbers of the distillation trials of ``spec`` that are running (and, with
    ``queued``, waiting in the queue): their record may still come."""
    states = (TrialState.RUNNING, TrialState.WAITING) if queued else (TrialState.RUNNING,)
    return [t.number for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get(trial_attrs.STUDENT_DISTILLED) == spec]


def distil_or_wait(
    study: Any, spec: str, distil: Callable[[], None], *, wait_s: float = WAIT_S,
    poll_s: float = POLL_S, on_wait: Callable[[str], None] | None = None,
) -> TrialRecord:
    """The measured distillation trial of ``spec``: one already recorded, the one ``distil``
    records now (run under the study lock when no other worker is distilling it), or another
    worker's, waited for. A failed distillation, or none within ``wait_s``, is one line."""
    with study_mod.study_lock(study):
        record = measured(study, spec)
        if record is None and not pending(study, spec, queued=False):
            distil()  # the study's other workers wait at the lock meanwhile
            record = measured(study, spec)
    return record if record is not None else _wait(study, spec, wait_s, poll_s, on_wait)


def _wait(study: Any, spec: str, wait_s: float, poll_s: float,
          on_wait: Callable[[str], None] | None) -> TrialRecord:
    """Poll the study for another worker's distillation of ``spec``."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        record = measured(study, spec)
        if record is not None:
            return record
        running = pending(study, spec)
        if not running:
            raise TrainingError(f"distilling student {spec!r} failed: {_why(study, spec)}")
        if time.monotonic() >= deadline:
            raise StudyError(
                f"student {spec!r}: trial {running[0]} (another worker's distillation of it) "
                f"gave no result within {wait_s:.0f} s; rerun the search once it has finished")
        if not told and on_wait is not None:
            on_wait(f"student {spec}: trial {running[0]} distils it in another worker; "
                    "waiting for its result")
            told = True
        time.sleep(poll_s)


def _why(study: Any, spec: str) -> str:
    failed = [r for r in study_mod.records(study)
              if r.attrs.get(trial_attrs.STUDENT_DISTILLED) == spec]
    return (failed[-1].fail_reason or failed[-1].state) if failed else "not run"


__all__ = ["POLL_S", "WAIT_S", "distil_or_wait", "measured", "pending"]
