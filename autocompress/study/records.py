"""Trial and study records as plain data, read from Optuna's frozen trials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress import trial_attrs
from autocompress.pareto import TrialRecord, feasibility

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
