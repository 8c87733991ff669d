"""Trial and study records as plain data, read from Optuna's frozen trials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress import trial_attrs
from autocompress.pareto import TrialRecord


def to_record(trial: FrozenTrial) -> TrialRecord:
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
        params=a.get(trial_attrs.PARAMS),
        feasible=bool(a.get(trial_attrs.FEASIBLE, False)) and trial.state == TrialState.COMPLETE,
        baseline=a.get(trial_attrs.BASELINE),
        plan=json.loads(plan) if isinstance(plan, str) else (plan or {}),
        plan_summary=a.get(trial_attrs.PLAN_SUMMARY, ""),
        rejected=a.get(trial_attrs.REJECTED),
        fail_reason=a.get(trial_attrs.FAIL_REASON),
        attrs=dict(a),
    )


def records(study: optuna.Study) -> list[TrialRecord]:
    return [to_record(t) for t in study.get_trials(deepcopy=False)]


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
