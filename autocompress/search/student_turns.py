"""The search's turns with ``--student``: who gets the next search trial when nothing is
queued (``WorkerStudy.on_empty_queue``), round robin between the teacher and each student.

The teacher's turn goes to its front proposer (or the sampler when it proposes nothing);
a student's turn queues a trial that carries only its base model, so the study's sampler
fills the student's prefixed parameter space (``students.param_prefix``). The front
proposer models the teacher's plan space, so it is shown the teacher's trials only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autocompress import study as study_mod
from autocompress.search.students import StudentBase
from autocompress.study import attrs as trial_attrs


class _TeacherTrials:
    """The study as the front proposer should see it: the teacher's trials only (it models
    the teacher's plan space; a student's plan keyed by other layer names means nothing
    there). Everything else is the study's own."""

    def __init__(self, study: Any) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [t for t in self._study.get_trials(*args, **kwargs)
                if t.user_attrs.get(trial_attrs.BASE_MODEL) in (None, trial_attrs.TEACHER_BASE)]


class Turns:
    """``WorkerStudy.on_empty_queue`` with students: round robin between the teacher (its
    front proposer, or the sampler when it proposes nothing) and each student (a trial
    queued with only its base, so the sampler fills the student's prefixed space)."""

    def __init__(self, study: Any, proposer: Callable[[], bool] | None,
                 bases: list[StudentBase]) -> None:
        self.study = study
        self.proposer = proposer
        if proposer is not None and hasattr(proposer, "study"):
            proposer.study = _TeacherTrials(study)
        self.bases = bases
        self.turn = 0
        self.queued = 0

    def __call__(self) -> bool:
        slot = self.turn % (len(self.bases) + 1)
        self.turn += 1
        if slot == 0:
            return bool(self.proposer()) if self.proposer is not None else False
        base = self.bases[slot - 1]
        study_mod.enqueue(self.study, {}, {trial_attrs.BASE_MODEL: base.spec})
        self.queued += 1
        return True

    def summary(self) -> str | None:
        inner = getattr(self.proposer, "summary", None)
        text = inner() if callable(inner) else None
        if self.queued:
            text = (text + "; " if text else "") + f"{self.queued} student trial(s) sampled"
        return text


def turns(study: Any, proposer: Any, bases: list[StudentBase]) -> Any:
    """The queue hook for the search: the proposer alone without students."""
    return Turns(study, proposer, bases) if bases else proposer


__all__ = ["Turns", "turns"]
