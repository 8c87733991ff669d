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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress import study as study_mod
from autocompress.errors import PlanError, StudyError
from autocompress.pareto import TrialRecord, pareto_front
from autocompress.plan import CompressionPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autocompress.export import ExportResult

__all__ = ["StudyHandle", "load_study", "rebuild"]


# -- rebuild ----------------------------------------------------------------------------------


@dataclass
class _ExampleData:
    """The one piece of ``DataSplits`` that ``build_student`` uses: an example input."""

    example: torch.Tensor

    def example_input(self, batch: int = 1) -> torch.Tensor:
        reps = -(-batch // self.example.shape[0])
        return self.example.repeat(reps, *([1] * (self.example.dim() - 1)))[:batch]


@dataclass
class _TaskShim:
    """Task-like object for ``objective.build_student`` (teacher + example input only)."""

    model: nn.Module
    data: _ExampleData


def _as_plan(plan: CompressionPlan | Mapping[str, Any] | str) -> CompressionPlan:
    if isinstance(plan, CompressionPlan):
        return plan
    if isinstance(plan, str):
        return CompressionPlan.from_json(plan)
    return CompressionPlan.from_dict(dict(plan))


def _first_in_channels(model: nn.Module) -> int:
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(module.in_channels)
    raise PlanError("cannot tell the model's input channels (no Conv layer); pass input_shape")


def _example_for(
    model: nn.Module, input_size: int | None, input_shape: tuple[int, ...] | None
) -> torch.Tensor:
    import torch

    if input_shape is not None:
        return torch.zeros((1, *input_shape))
    if input_size is not None:
        return torch.zeros((1, _first_in_channels(model), input_size, input_size))
    raise PlanError(
        "rebuild needs the input size to trace the model for pruning; pass input_size=N "
        "(square images) or input_shape=(C, H, W)"
    )


def rebuild_parts(
    model_spec: str,
    weights: str | Path | None,
    plan: CompressionPlan | Mapping[str, Any] | str,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
    round_to: int = 8,
) -> tuple[nn.Module, nn.Module]:
    """(model, float structure): ``rebuild``'s result and the pruned, BN-folded float model
    it was made from (same layer names; what per-layer FLOPs/params are counted on)."""
    import torch

    from autocompress import intake, quantize
    from autocompress.objective import build_student

    plan = _as_plan(plan)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    teacher = intake.load_model(
        model_spec, weights, num_classes=num_classes, input_size=input_size, input_shape=shape
    )
    example = _example_for(teacher, input_size, shape)
    student = build_student(_TaskShim(teacher, _ExampleData(example)), plan, round_to)
    student.eval()
    if state_dict is None:
        return quantize.prepare_qat(student, plan).eval(), student
    if isinstance(state_dict, (str, Path)):
        state_dict = torch.load(str(state_dict), map_location="cpu", weights_only=True)
    state = dict(state_dict)
    # Baseline trials save the float student (no fake-quant buffers); search trials save the
    # QAT model. The keys tell which one this state_dict belongs to.
    if set(state) == set(student.state_dict()):
        _load_strict(student, state, plan)
        return student, student
    model = quantize.prepare_qat(student, plan)
    _load_strict(model, state, plan)
    float_model = quantize.strip_fake_quant(model)[0] if quantize.is_prepared(model) else model
    return model.eval(), float_model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], plan: CompressionPlan) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("wrong shape", wrong))
            if keys
        ]
        raise PlanError(
            f"state_dict does not fit the model rebuilt from plan {plan.summary()!r} "
            f"({'; '.join(parts)}); pass the state_dict saved by the same trial"
        )
    model.load_state_dict(state, strict=True)


def rebuild(
    model_spec: str,
    weights: str | Path | None,
    plan: CompressionPlan | Mapping[str, Any] | str,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    state_dict: Mapping[str, torch.Tensor] | str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    round_to: int = 8,
) -> nn.Module:
    """The model a trial fine-tuned, rebuilt from plain data, in eval mode.

    intake.load_model(spec, weights) -> objective.build_student (prune per plan with
    ``round_to``, BN fold) -> quantize.prepare_qat(plan) -> load ``state_dict`` (a dict or a
    ``torch.save`` file; a float state_dict of a baseline trial skips prepare_qat). Without a
    state_dict the QAT model carries the teacher's (pruned) weights. The pruned channel
    counts depend only on the plan and ``round_to``, so ``weights`` may be None when a
    state_dict is given. ``input_shape`` (C, H, W) or ``input_size`` traces the model.
    """
    return rebuild_parts(
        model_spec, weights, plan, num_classes=num_classes, input_size=input_size,
        input_shape=input_shape, state_dict=state_dict, round_to=round_to,
    )[0]


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
    """Open a study a search wrote (default storage: ``sqlite:///studies/<study>.db``)."""
    return StudyHandle(study, storage or f"sqlite:///studies/{study}.db", artifacts)
