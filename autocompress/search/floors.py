"""Budgets no candidate can meet, refused before a new study records anything: the floor
structures (the most-pruned plan at each width) pre-checked, the fastest and smallest of
them compared with the budgets."""

from __future__ import annotations

from typing import Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.config.settings import SpaceSettings
from autocompress.errors import BudgetError
from autocompress.model import space
from autocompress.runtime import measure
from autocompress.transform.student import build_student
from autocompress.trial.runner import TrialRunner

# A latency budget is called impossible only when it is clearly below the fastest structure
# measured, so machine noise cannot turn a tight-but-possible budget into an error.
_FLOOR_NOISE = 0.8


def check_floors(
    runner: TrialRunner,
    inventory: Any,
    settings: SpaceSettings,
    budgets: list[Budget],
    study: Any,
) -> None:
    """Refuse a budget no candidate in the space can meet, before any trial is recorded.

    The floor structures are the most-pruned plans at each allowed width (and activation
    choice); the fastest and the smallest of them (and of any trial already recorded) bound
    what the search can reach. The size limit quoted is the smallest file's bytes and, below
    it, the packing limit (parameters x bits) no file can go under.
    """
    if not budgets:
        return
    recs = [r for r in study_mod.records(study) if r.budget_latency_ms is not None]
    best_latency = min((r.budget_latency_ms or 0.0 for r in recs), default=float("inf"))
    best_size = min((r.size_bytes for r in recs if r.size_bytes), default=float("inf"))
    where_latency = where_size = "the trials recorded"
    packing = float("inf")
    ratio = space.prune_high(settings)
    for bits in sorted(set(settings.bits)):
        for acts in (settings.activation_bits if bits < 32 else settings.activation_bits[:1]):
            plan = space.uniform_plan(inventory, settings, bits=bits, ratio=ratio,
                                      activation_bits=acts)
            student = build_student(runner.ctx.task, plan, runner.ctx.training.round_to)
            pre = runner.precheck(student, plan, None, runner.ctx.workdir / "floors")
            label = f"every group pruned {ratio:.0%} at {bits} bits" + (
                " weight-only" if bits < 32 and acts == 32 else "")
            if pre.estimate_ms < best_latency:
                best_latency, where_latency = pre.estimate_ms, label
            if pre.size_bytes < best_size:
                best_size, where_size = pre.size_bytes, label
                packing = measure.packing_limit_bytes(student, plan)
    for budget in budgets:
        if budget.kind == "latency" and budget.value < best_latency * _FLOOR_NOISE:
            ref = runner.ctx.reference
            ratios = "" if ref is None else (
                f" = x{best_latency / ref.median_ms:.2f} of the fp32 reference "
                f"{ref.median_ms:.3g} ms; the budget needs x{budget.value / ref.median_ms:.2f}")
            raise BudgetError(
                f"latency budget {budget.shown()} is below the fastest candidate in the space "
                f"({best_latency:.3g} ms, {where_latency}{ratios}); raise the budget "
                "(nothing was recorded)"
            )
        if budget.kind == "size" and budget.value < best_size:
            limit = "" if packing == float("inf") else (
                f"; its packing limit, parameters x bits, is {packing / 1000:.1f} KB")
            raise BudgetError(
                f"size budget {budget.text} is below the smallest candidate in the space "
                f"({best_size / 1000:.1f} KB, {where_size}{limit}); raise the budget "
                "(nothing was recorded)"
            )
