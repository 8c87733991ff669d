"""The Python API over a finished study: read the front, pick a trial, rebuild it, export it.

    import autocompress
    study = autocompress.load_study("demo")
    front = study.pareto_front()                 # list[TrialRecord], smallest file first
    result = study.export(front[0], "out/")      # same code path as `autocompress export`
    model = study.rebuild(front[0].number)       # the fine-tuned PyTorch model (QAT form)

``rebuild`` turns plain data (model spec, plan, state_dict) back into the model a trial
fine-tuned; nothing here needs the search's process or live objects (a plan is plain data).
Importing this module does not import torch or onnxruntime (reading a study should not
cost that); ``rebuild`` and ``export`` import them when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.config.options import default_storage_url
from autocompress.errors import StudyError
from autocompress.results.pareto import pareto_front
from autocompress.study.records import TrialRecord
from autocompress.trial.rebuild import rebuild

if TYPE_CHECKING:
    from torch import nn

    from autocompress.export import ExportResult

__all__ = ["StudyHandle", "load_study", "rebuild"]


# -- studies ----------------------------------------------------------------------------------


class StudyHandle:
    """A study in storage, read on demand (other workers may still be adding trials)."""

    def __init__(self, name: str, storage_url: str, artifacts: str | Path | None = None) -> None:
        self.name = name
        self.storage_url = storage_url
        self.artifacts = None if artifacts is None else str(artifacts)
        self._study = study_mod.load_existing_study(storage_url, name)

    def __repr__(self) -> str:
        return f"StudyHandle(name={self.name!r}, storage_url={self.storage_url!r})"

    @property
    def info(self) -> study_mod.StudyInfo:
        return study_mod.study_info(self._study, self.storage_url)

    def records(self) -> list[TrialRecord]:
        """Every trial (any state) as plain records, in trial-number order."""
        return study_mod.records(self._study)

    def budgets(self) -> list[Budget]:
        """The study's budgets, as the search recorded them."""
        return [Budget.from_dict(b) for b in self.info.json_attr("budgets", []) or []]

    def pareto_front(self) -> list[TrialRecord]:
        """Feasible measured non-dominated trials over the study's objectives, smallest first."""
        objectives = tuple(self.info.identity.get("objectives") or ("accuracy", "size"))
        return pareto_front(self.records(), objectives)

    def trial(self, number: int) -> TrialRecord:
        records = self.records()
        for record in records:
            if record.number == number:
                return record
        raise StudyError(
            f"trial {number} does not exist in study {self.name!r} "
            f"({_numbers(records)}); records() lists them"
        )

    def export(
        self, trial: int | TrialRecord | None, out: str | Path, **opts: Any
    ) -> ExportResult:
        """Export one trial (or, with ``trial=None``, the best within budgets) to ``out``.

        ``opts``: ``budgets`` (tuple of "50ms"/"4MB"), ``max_accuracy_drop`` ("1%" or 0.01),
        ``force``, ``verify`` -- the options of ``autocompress export``.
        """
        from autocompress import export

        number = trial.number if isinstance(trial, TrialRecord) else trial
        opts.setdefault("artifacts_dir", self.artifacts)
        return export.export_from_storage(
            self.storage_url, self.name, out=out, trial=number, best=number is None, **opts
        )

    def rebuild(self, trial: int | TrialRecord) -> nn.Module:
        """The fine-tuned PyTorch model of a trial (checksum-checked download)."""
        from autocompress import export

        number = trial.number if isinstance(trial, TrialRecord) else trial
        return export.load_trial_model(
            self.storage_url, self.name, number, artifacts_dir=self.artifacts
        )


def _numbers(records: list[TrialRecord]) -> str:
    if not records:
        return "it has no trials"
    return f"trials {records[0].number}-{records[-1].number}"


def load_study(
    study: str = "demo", storage: str | None = None, artifacts: str | Path | None = None
) -> StudyHandle:
    """Open a study a search wrote (default storage: ``sqlite:///studies/<study>.db``; an
    empty ``storage`` is refused, not read as the default)."""
    return StudyHandle(study, default_storage_url(study) if storage is None else storage,
                       artifacts)
