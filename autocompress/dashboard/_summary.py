"""A study as the pages show it: one row per trial (the search's own record of it) and the
study's summary. Fronts, the progress curve and every comparison with fp32 come from
``autocompress.results`` (the rules ``show`` and export use), computed here on the server
and sent as JSON, so the page's script only draws them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autocompress.dashboard import _analysis as an
from autocompress.dashboard._db import iso
from autocompress.results.metrics import row_versus_fp32, times_faster
from autocompress.results.pareto import (
    fp32_row,
    is_compressed_candidate,
    progress_curve,
    row_fronts,
)
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import feasibility, retried_as, to_record, trial_constraints

METRIC_ATTRS = (
    "accuracy",
    "test_accuracy",
    "size_bytes",
    "zip_size_bytes",
    "latency_ms",
    "latency_spread_ms",
    "latency_vs_fp32",
    "fp32_latency_ms",
    "flops",
    "bops",
    "params",
)
# The guide's rates each row carries (the table's columns).
_ROW_RATES = ("accuracy_drop_rate", "flop_reduction_rate", "bops_reduction_rate")


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Everything the study page shows, as JSON-ready data."""
    attrs = dict(study.user_attrs)
    identity = an.maybe_json(attrs.get("identity"))
    identity = identity if isinstance(identity, dict) else {}
    directions = [d.name.lower() for d in study.directions]
    names = study.metric_names or [None] * len(directions)
    keys = [an.metric_key(n, i) for i, n in enumerate(names)]
    frozen = study.get_trials(deepcopy=False)
    retries = retried_as(frozen)
    trials = [trial_row(t, keys, retries) for t in frozen]
    front, front_2d = _mark_fronts(trials, keys, directions)
    budgets = an.maybe_json(attrs.get("budgets")) or []
    return {
        "name": study.study_name,
        "model_spec": attrs.get("model_spec") or identity.get("model_spec"),
        "data_spec": attrs.get("data_spec") or identity.get("data_spec"),
        "budgets": budgets if isinstance(budgets, list) else [],
        "objectives": an.maybe_json(attrs.get("objectives")) or keys,
        "metric_names": study.metric_names,
        "metric_keys": keys,
        "directions": directions,
        "created_by": attrs.get("created_by"),
        "data": an.maybe_json(attrs.get("data")),
        "learning_rate_probe": an.maybe_json(attrs.get("learning_rate_probe")),
        "sensitivity": an.maybe_json(attrs.get("sensitivity")),
        "counts": _counts(trials),
        "trials": trials,
        "front": front,
        "front_2d": front_2d,
        "progress": progress_curve(trials),
        "baselines": {
            t["baseline"]: t["number"]
            for t in trials
            if t["baseline"] and t["state"] == "COMPLETE"
        },
        **_best_and_smallest(trials),
        "last_activity": max((s for s in (t["datetime_complete"] or t["datetime_start"]
                                          for t in trials) if s), default=None),
        "signature": hashlib.sha1(
            json.dumps([(t["number"], t["state"], t["feasible"]) for t in trials]).encode()
        ).hexdigest()[:16],
    }


def _mark_fronts(
    trials: list[dict[str, Any]], keys: list[str], directions: list[str]
) -> tuple[list[int], list[int]]:
    """Mark each row superseded / on the front and with the guide's rates against fp32 (as
    ``show`` and the report compute them); returns (front, front_2d)."""
    gone, front, front_2d = row_fronts(trials, keys, [d == "maximize" for d in directions])
    on_front = set(front)
    fp32 = fp32_row(trials)
    for t in trials:
        t["superseded"] = t["number"] in gone
        t["on_front"] = t["number"] in on_front
    for t in trials:
        vs = row_versus_fp32(t, fp32)
        for key in _ROW_RATES:
            t[key] = vs[key]
        # the table's speed column: the interleaved ratio only, no fallback to other runs
        ratio = t["latency_vs_fp32"]
        t["times_faster"] = times_faster(ratio if ratio is not None and ratio > 0 else None)
    return sorted(on_front), front_2d


def _counts(trials: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"total": len(trials)}
    for state in ("COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING"):
        counts[state.lower()] = sum(t["state"] == state for t in trials)
    counts["feasible"] = sum(t["feasible"] is True for t in trials)
    counts["infeasible"] = sum(t["feasible"] is False for t in trials)
    counts["failed"] = counts.pop("fail")
    return counts


def _best_and_smallest(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The most accurate and the smallest compressed candidate (the fp32 model left out)."""
    candidates = [t for t in trials if is_compressed_candidate(t)]
    best = max(
        (t for t in candidates if t["accuracy"] is not None),
        key=lambda t: t["accuracy"],
        default=None,
    )
    smallest = min(
        (t for t in candidates if t["size_bytes"] is not None),
        key=lambda t: t["size_bytes"],
        default=None,
    )
    return {"best_accuracy": _pick(best, "accuracy"),
            "smallest_size": _pick(smallest, "size_bytes")}


def _pick(trial: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {"value": trial[key], "number": trial["number"], "baseline": trial["baseline"]}


def trial_row(t: FrozenTrial, keys: list[str], retries: dict[int, int]) -> dict[str, Any]:
    """One trial as a table row: the search's own record of it (``to_record``: metrics
    measured on the artifact, feasibility, failure reason), shaped for the page."""
    rec = to_record(t, retries)
    a = rec.attrs
    state = rec.state
    row: dict[str, Any] = {"number": rec.number, "state": state}
    for name in METRIC_ATTRS:
        row[name] = an.number_or_none(getattr(rec, name, a.get(name)))
    if t.values is not None:
        for i, key in enumerate(keys):
            # Rejected trials carry a floor accuracy as objective value, never a measurement.
            if row.get(key) is None and not (key == "accuracy" and rec.rejected):
                row[key] = an.number_or_none(t.values[i]) if i < len(t.values) else None
    row["values"] = list(t.values) if t.values is not None else None
    row["feasible"] = feasibility(state, a, trial_constraints(t))
    row["baseline"] = rec.baseline
    row["warm_start"] = a.get(trial_attrs.WARM_START)
    row["guided"] = a.get(trial_attrs.GUIDED)
    parent = a.get(trial_attrs.PARENT)
    row["parent_trial"] = int(parent) if parent is not None else None
    row["plan_summary"] = a.get(trial_attrs.PLAN_SUMMARY)
    row["rejected"] = rec.rejected
    row["fail_reason"] = rec.fail_reason
    row["early_stopped"] = a.get(trial_attrs.EARLY_STOPPED)
    row["reason"] = rec.rejected or rec.fail_reason or a.get(trial_attrs.EARLY_STOPPED)
    row["has_artifact"] = bool(a.get(trial_attrs.ARTIFACT_ID))
    row["datetime_start"] = iso(t.datetime_start)
    row["datetime_complete"] = iso(t.datetime_complete)
    row["duration_s"] = (
        (t.datetime_complete - t.datetime_start).total_seconds()
        if t.datetime_complete and t.datetime_start
        else None
    )
    return row
