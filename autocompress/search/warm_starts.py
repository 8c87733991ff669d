"""The first search trials: the uniform recipes a practitioner tries by hand, within budget.

Uniform QAT + KD at each width below 32 bits (no pruning), fine-tuned like every candidate,
so the front starts from them and the sampler's model from real points. Under a budget,
a warm start whose structure is already known to break it is skipped with a note (the int8
PTQ baseline has the unpruned int8 structure; int4 weights run no faster than float, so the
fp32 baseline bounds the unpruned int4 one), and budget-aware warm starts are added: every
group pruned uniformly at the smallest ratio whose pre-check meets the budgets, at each width.
The ratio is found by bisection over the prune grid with real pre-checks (about a second
each on ResNet-20, cached by structure), not by a model: a warm start must be within budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autocompress.config.budgets import Budget
from autocompress.config.settings import RunSettings, SpaceSettings
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.study.records import TrialRecord
from autocompress.transform.student import build_student
from autocompress.trial.runner import TrialRunner

log = logging.getLogger("autocompress")

WARM_START_SHARE = 3  # a search needs this many trials per warm start to get them
# A pruned warm start aims this far under the latency budget, so the final measurement's
# noise (same estimator, fewer runs) cannot push it over.
BUDGET_MARGIN = 0.95
WEIGHT_ONLY = space.WEIGHT_ONLY


@dataclass(frozen=True)
class WarmStarts:
    named: list[tuple[str, dict[str, Any]]]  # (name, Optuna params), in the order to run
    notes: list[str]  # what was skipped or added, and why (one line each)


def plan_warm_starts(
    runner: TrialRunner,
    inventory: Inventory,
    settings: SpaceSettings,
    run: RunSettings,
    budgets: Sequence[Budget],
    records: Sequence[TrialRecord],
) -> WarmStarts:
    widths = sorted((b for b in settings.bits if b < 32), reverse=True)
    if not run.warm_starts or not widths:
        return WarmStarts([], [])
    named: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    for bits in widths:
        acts = space.activations_for(bits, settings)
        over = _baseline_over(bits, acts, budgets, records)
        if over:
            notes.append(f"warm start uniform-int{bits} skipped: {over}")
            continue
        plan = space.uniform_plan(inventory, settings, bits=bits, activation_bits=acts)
        named.append((f"uniform-int{bits}", space.plan_to_params(plan, inventory, settings)))
    if budgets and space.prune_high(settings) > 0:
        pruned, pruned_notes = _pruned_warm_starts(runner, inventory, settings, budgets,
                                                   records, widths)
        named += pruned
        notes += pruned_notes
    # Pruned warm starts first under a budget: they are the ones known to fit it.
    named.sort(key=lambda item: not item[0].startswith("budget-"))
    room = run.trials // WARM_START_SHARE
    if len(named) > room:
        dropped = [name for name, _ in named[room:]]
        if dropped:
            notes.append(f"warm starts {', '.join(dropped)} left out: --trials "
                         f"{run.trials} leaves room for {room} (one per {WARM_START_SHARE})")
        named = named[:room]
    if settings.ptq_methods:
        # PTQ twins first: seconds each, and the QAT runs after them are then measured
        # against what plain calibration already gives.
        plans = [(name, space.params_to_plan(params, inventory, settings))
                 for name, params in named]
        twins = space.ptq_twins(plans, settings, every_method="uniform-int8")
        named = [(name, space.plan_to_params(plan, inventory, settings))
                 for name, plan in twins] + named
    return WarmStarts(named, notes)


def _pruned_warm_starts(
    runner: TrialRunner,
    inventory: Inventory,
    settings: SpaceSettings,
    budgets: Sequence[Budget],
    records: Sequence[TrialRecord],
    widths: Sequence[int],
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Under budgets: per width, every group pruned by the least uniform ratio the pre-check
    finds within them. When no quantized width gets one under a latency budget, pruning
    alone at float: a small model's integer layers cost more per operator than they save
    (ResNet-20 pruned 70% ran at 0.51x fp32 in float but 0.68x at int8, no faster than
    unpruned int8 at 0.67x), so the fastest structures the space builds are float ones."""
    named: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    tried = list(widths)
    if 32 in settings.bits and any(b.kind == "latency" for b in budgets):
        tried.append(32)
    for bits in tried:
        if bits == 32 and named:
            break  # a quantized one fits: the float fallback is not needed
        acts = space.activations_for(bits, settings)
        # The measured baseline outranks a pre-check at ratio 0: when the unpruned
        # structure measured over the budget (int8 PTQ at 0.424 ms against 0.414 ms while
        # its pre-check fit), "no pruning" is no warm start at all; the least pruning is.
        unpruned_over = bool(_baseline_over(bits, acts, budgets, records))
        ratio = _smallest_ratio_within(runner, inventory, settings, bits, acts,
                                       skip_unpruned=unpruned_over)
        what = ("float" if bits == 32 else
                f"int{bits}" + (" weight-only" if acts == WEIGHT_ONLY else ""))
        name = "budget-fp32" if bits == 32 else f"budget-int{bits}"
        if ratio is None:
            notes.append(f"no uniform pruning ratio up to {space.prune_high(settings):.0%} "
                         f"meets the budgets at {what}: no pruned warm start there")
        elif ratio > 0:
            plan = space.uniform_plan(inventory, settings, bits=bits, ratio=ratio,
                                      activation_bits=acts)
            named.append((name, space.plan_to_params(plan, inventory, settings)))
            notes.append(f"warm start {name}: every group pruned {ratio:.0%} at {what}, the "
                         "least uniform pruning the pre-check found within the budgets")
    return named, notes


def _baseline_over(
    bits: int, activations: int, budgets: Sequence[Budget], records: Sequence[TrialRecord]
) -> str:
    """Why the unpruned structure at ``bits`` is known to break a budget ('' when it is not).

    The int8 PTQ baseline is the unpruned int8 structure with uint8 activations; a structure
    whose weights are dequantized to float (weight-only) or int4 runs no faster than fp32."""
    if bits == 8 and activations == 8:
        name, kinds = "int8-ptq", ("latency", "size")
    else:
        name, kinds = "fp32", ("latency",)
    base = next((r for r in records if r.baseline == name), None)
    if base is None or base.size_bytes is None:
        return ""
    latency = base.budget_latency_ms
    for b in budgets:
        if b.kind not in kinds or latency is None:
            continue
        if b.violation(latency, base.size_bytes) > 0:
            return (f"the {name} baseline (its unpruned structure at no more speed) is over "
                    f"the budget: {b.describe(latency, base.size_bytes)}")
    return ""


def _smallest_ratio_within(
    runner: TrialRunner, inventory: Inventory, settings: SpaceSettings, bits: int,
    activations: int, *, skip_unpruned: bool = False,
) -> float | None:
    """Smallest ratio on the prune grid whose uniform plan at ``bits`` meets every budget
    (latency with the margin), by bisection with real pre-checks; None when even the
    largest ratio does not. ``skip_unpruned``: ratio 0 is known over (measured), the grid
    starts one step up."""
    step = settings.prune_step
    first = 1 if skip_unpruned else 0
    grid = [round(k * step, 6)
            for k in range(first, round(space.prune_high(settings) / step) + 1)]
    if not grid:
        return None

    def fits(ratio: float) -> bool:
        plan = space.uniform_plan(inventory, settings, bits=bits, ratio=ratio,
                                  activation_bits=activations)
        student = build_student(runner.ctx.task, plan, runner.ctx.training.round_to)
        pre = runner.precheck(student, plan, None, runner.ctx.workdir / "warm-starts")
        return all(
            b.violation(pre.estimate_ms / (BUDGET_MARGIN if b.kind == "latency" else 1.0),
                        pre.size_bytes) <= 0
            for b in runner.ctx.budgets
        )

    if fits(grid[0]):
        return grid[0]
    if not fits(grid[-1]):
        return None
    low, high = 0, len(grid) - 1  # grid[low] fails, grid[high] fits
    while high - low > 1:
        mid = (low + high) // 2
        if fits(grid[mid]):
            high = mid
        else:
            low = mid
    return grid[high]
