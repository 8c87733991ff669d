"""Trial and study records as plain data, read from Optuna's frozen trials."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.study import attrs as trial_attrs


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial as plain data (built from the study database by ``to_record``)."""

    number: int
    state: str  # COMPLETE | FAIL | PRUNED | RUNNING | WAITING
    accuracy: float | None = None
    test_accuracy: float | None = None
    size_bytes: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    latency_vs_fp32: float | None = None
    # ratio to fp32 x the study's fp32 reference: what latency budgets are judged on
    latency_estimate_ms: float | None = None
    flops: float | None = None
    bops: float | None = None
    params: float | None = None
    feasible: bool = False
    baseline: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    plan_summary: str = ""
    rejected: str | None = None
    fail_reason: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_latency_ms(self) -> float | None:
        """The latency budgets are judged on: the ratio-based estimate where the study made
        one (see ``runtime/latency_reference.py``), else the absolute median (older studies)."""
        return self.latency_estimate_ms if self.latency_estimate_ms is not None else (
            self.latency_ms)

    @property
    def objective_size(self) -> float | None:
        """The bytes the size objective and size budgets count: the zipped file where the
        study's size metric is zip, else the file (both are always recorded)."""
        if self.attrs.get(trial_attrs.SIZE_METRIC) == "zip":
            zipped = self.attrs.get(trial_attrs.ZIP_SIZE)
            if zipped is not None:
                return float(zipped)
        return self.size_bytes

    @property
    def quantized_by_runtime(self) -> bool:
        """ONNX Runtime quantized its file from a float model (the int8 PTQ and dynamic
        baselines, a plan realised by PTQ): the PyTorch side is that float model, so the
        two may disagree on a few samples."""
        return (self.baseline in ("int8-ptq", "int8-dynamic")
                or self.plan.get("realisation") == "ptq")

    @property
    def measured(self) -> bool:
        """Completed with figures measured on its exported file (not only a pre-check)."""
        return self.state == "COMPLETE" and self.rejected is None and self.accuracy is not None

    def objective(self, name: str) -> float:
        """Value oriented so that larger is better, for dominance tests."""
        if name == "accuracy":
            return float(self.accuracy or 0.0)
        if name == "size":
            return -float(self.objective_size or 0.0)
        if name == "latency":
            return -float(self.budget_latency_ms or 0.0)
        raise ValueError(f"unknown objective {name!r}")

    def json_attr(self, name: str) -> Any:
        value = self.attrs.get(name)
        return json.loads(value) if isinstance(value, str) else value

    @property
    def base_model(self) -> str | None:
        """The spec of the student (``--student``) this trial compresses or is; None for
        the teacher's trials (plans keyed by the teacher's layer names)."""
        base = self.attrs.get(trial_attrs.BASE_MODEL)
        return None if base in (None, trial_attrs.TEACHER_BASE) else str(base)


def feasibility(state: str, attrs: dict[str, Any],
                constraints: Sequence[float] | dict[str, float] | None = None) -> bool | None:
    """Feasibility of one trial; None when it has no final values (not COMPLETE).

    Order of evidence: the search's own ``feasible`` attribute, then its ``constraints``
    attribute (feasible when every value <= 0), then Optuna's constraint values (studies
    not written by autocompress). A trial with no constraint at all is feasible, as in Optuna.
    """
    if state != "COMPLETE":
        return None
    flag = attrs.get(trial_attrs.FEASIBLE)
    if isinstance(flag, bool):
        return flag
    recorded = attrs.get("constraints")
    if isinstance(recorded, str) and recorded[:1] == "{":
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError:
            recorded = None
    if isinstance(recorded, dict) and recorded:
        values = [finite_number(v) for v in recorded.values()]
        return all(v is not None and v <= 0 for v in values)
    given = list(constraints.values()) if isinstance(constraints, dict) else list(
        constraints or ())
    return all(float(v) <= 0 for v in given)


def finite_number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# Optuna fails a trial whose worker stopped beating from another process, after the fact:
# nothing can be written on a finished trial then, so readers derive its reason from the
# retry Optuna queued (system attribute "failed_trial" = the failed trial's number).
STALE_REASON = "its worker stopped sending heartbeats (killed, or lost the database)"


def retried_as(trials: list[FrozenTrial]) -> dict[int, int]:
    """Failed trial number -> the number of the retry queued for it."""
    out: dict[int, int] = {}
    for t in trials:
        failed = t.system_attrs.get("failed_trial")
        if isinstance(failed, int) and failed not in out:
            out[failed] = t.number
    return out


def failure_reason(trial: FrozenTrial, retries: dict[int, int]) -> str | None:
    """Why a trial failed: what its worker recorded, or, for a heartbeat-stale trial that
    recorded nothing, that its worker stopped beating and which trial ran it again."""
    recorded = trial.user_attrs.get(trial_attrs.FAIL_REASON)
    if recorded or trial.state != TrialState.FAIL or trial.number not in retries:
        return recorded
    return f"{STALE_REASON}; run again as trial #{retries[trial.number]}"


def to_record(trial: FrozenTrial, retries: dict[int, int] | None = None) -> TrialRecord:
    a = trial.user_attrs
    plan = a.get(trial_attrs.PLAN)
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        accuracy=a.get(trial_attrs.ACCURACY),
        test_accuracy=a.get(trial_attrs.TEST_ACCURACY),
        size_bytes=a.get(trial_attrs.SIZE),
        latency_ms=a.get(trial_attrs.LATENCY),
        latency_spread_ms=a.get(trial_attrs.LATENCY_SPREAD),
        latency_vs_fp32=a.get(trial_attrs.LATENCY_VS_FP32),
        latency_estimate_ms=a.get(trial_attrs.LATENCY_ESTIMATE),
        flops=a.get(trial_attrs.FLOPS),
        bops=a.get(trial_attrs.BOPS),
        params=a.get(trial_attrs.PARAMS),
        feasible=bool(feasibility(trial.state.name, a, trial_constraints(trial))),
        baseline=a.get(trial_attrs.BASELINE),
        plan=json.loads(plan) if isinstance(plan, str) else (plan or {}),
        plan_summary=a.get(trial_attrs.PLAN_SUMMARY, ""),
        rejected=a.get(trial_attrs.REJECTED),
        fail_reason=failure_reason(trial, retries or {}),
        attrs=dict(a),
    )


def trial_constraints(trial: FrozenTrial) -> list[float]:
    return list(getattr(trial, "constraints", None) or ())


def records(study: optuna.Study) -> list[TrialRecord]:
    trials = study.get_trials(deepcopy=False)
    retries = retried_as(trials)
    return [to_record(t, retries) for t in trials]


@dataclass(frozen=True)
class StudyInfo:
    """The study-level facts readers need, as plain data."""

    name: str
    storage_url: str
    identity: dict[str, Any]
    attrs: dict[str, Any]

    def json_attr(self, key: str, default: Any = None) -> Any:
        value = self.attrs.get(key, default)
        return json.loads(value) if isinstance(value, str) else value


def study_info(study: optuna.Study, storage_url: str) -> StudyInfo:
    attrs = dict(study.user_attrs)
    return StudyInfo(
        name=study.study_name,
        storage_url=storage_url,
        identity=json.loads(attrs.get("identity", "{}")),
        attrs=attrs,
    )
