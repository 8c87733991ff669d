"""Trial and study records as plain data, read from Optuna's frozen trials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.pareto import TrialRecord


def to_record(trial: FrozenTrial) -> TrialRecord:
    a = trial.user_attrs
    plan = a.get("plan")
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        accuracy=a.get("accuracy"),
        test_accuracy=a.get("test_accuracy"),
        size_bytes=a.get("size_bytes"),
        latency_ms=a.get("latency_ms"),
        latency_spread_ms=a.get("latency_spread_ms"),
        latency_vs_fp32=a.get("latency_vs_fp32"),
        latency_estimate_ms=a.get("latency_estimate_ms"),
        flops=a.get("flops"),
        params=a.get("params"),
        feasible=bool(a.get("feasible", False)) and trial.state == TrialState.COMPLETE,
        baseline=a.get("baseline"),
        plan=json.loads(plan) if isinstance(plan, str) else (plan or {}),
        plan_summary=a.get("plan_summary", ""),
        rejected=a.get("rejected"),
        fail_reason=a.get("fail_reason"),
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
