"""A trial against the study's budgets: its Optuna constraints, and the rejections recorded
before any fine-tune (over budget at the pre-check, or predicted so by the latency model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from autocompress.config.budgets import Budget
from autocompress.runtime.latency_reference import estimate_ms
from autocompress.study import TrialPruned
from autocompress.study import attrs as trial_attrs
from autocompress.trial.context import Precheck, SearchContext


def broken_budgets(
    budgets: Sequence[Budget], latency_ms: float, size_bytes: float
) -> dict[str, float]:
    """The budgets broken by these figures, each with its relative excess."""
    return {
        b.text: b.violation(latency_ms, size_bytes)
        for b in budgets
        if b.violation(latency_ms, size_bytes) > 0
    }


def set_constraints(
    trial: Any, budgets: Sequence[Budget], latency_ms: float, size_bytes: float, *,
    only_latency: bool = False,
) -> bool:
    """Set every budget as an Optuna constraint (on every path); True when all are met.
    ``only_latency``: the size is unknown (a predicted rejection); size budgets get 0."""
    values = {
        b.text: (0.0 if only_latency and b.kind == "size"
                 else b.violation(latency_ms, size_bytes))
        for b in budgets
    }
    if not values:
        values = {"none": -1.0}  # a trial with no constraint must still say it is feasible
    for name, value in values.items():
        trial.set_constraint(name, value)
    feasible = all(v <= 0 for v in values.values())
    trial.set_user_attr(trial_attrs.CONSTRAINTS, json.dumps(values))
    trial.set_user_attr(trial_attrs.FEASIBLE, feasible)
    return feasible


def reject(ctx: SearchContext, trial: Any, pre: Precheck, broken: dict[str, float]) -> None:
    """Over budget before any fine-tune: record why and the pre-check figures, stop.

    Recorded as PRUNED with its constraints and no objective values: nothing was
    measured, so the sampler must not learn an accuracy for it. TPE (the default) sorts
    such trials by their constraint violation; NSGA-II and GP read COMPLETE trials only
    and ignore them (they learn the budget from measured trials instead)."""
    set_constraints(trial, ctx.budgets, pre.estimate_ms, pre.size_bytes)
    reasons = [
        b.describe(pre.estimate_ms, pre.size_bytes)
        for b in ctx.budgets
        if b.text in broken
    ]
    text = "over budget at pre-check: " + "; ".join(reasons)
    if ctx.reference is not None and any(b.kind == "latency" for b in ctx.budgets):
        text += f" (x{pre.ratio:.2f} of fp32 x {ctx.reference.median_ms:.3g} ms reference)"
    trial.set_user_attr(trial_attrs.REJECTED, text)
    trial.set_user_attr(trial_attrs.SIZE, pre.size_bytes)
    trial.set_user_attr(trial_attrs.LATENCY, pre.latency.median_ms)
    trial.set_user_attr(trial_attrs.LATENCY_SPREAD, pre.latency.spread_ms)
    trial.set_user_attr(trial_attrs.LATENCY_VS_FP32, pre.ratio)
    trial.set_user_attr(trial_attrs.LATENCY_ESTIMATE, pre.estimate_ms)
    trial.set_user_attr(trial_attrs.FP32_LATENCY, pre.reference.median_ms)
    if ctx.reference is not None:
        trial.set_user_attr(trial_attrs.FP32_REFERENCE, ctx.reference.median_ms)
    trial.set_user_attr(trial_attrs.RUNTIME, json.dumps(ctx.runtime_info(pre.session_options)))
    raise TrialPruned(text)


def reject_predicted(ctx: SearchContext, trial: Any, predicted: float | None) -> None:
    """Far over the latency budget by the study's latency model: recorded as rejected
    without a pre-check (no file was exported or timed; the figures are a prediction)."""
    if predicted is None or ctx.reference is None:  # should_skip never says so; be safe
        return
    estimate = estimate_ms(predicted, ctx.reference)
    set_constraints(trial, ctx.budgets, estimate, 0.0, only_latency=True)
    reasons = [b.describe(estimate, 0.0) for b in ctx.budgets if b.kind == "latency"]
    text = ("predicted over budget by the latency model (not measured): "
            + "; ".join(reasons) + f" (x{predicted:.2f} of fp32 predicted)")
    trial.set_user_attr(trial_attrs.REJECTED, text)
    trial.set_user_attr(trial_attrs.REJECTED_BY_MODEL, True)
    trial.set_user_attr(trial_attrs.LATENCY_ESTIMATE, estimate)
    trial.set_user_attr(trial_attrs.FP32_REFERENCE, ctx.reference.median_ms)
    raise TrialPruned(text)
