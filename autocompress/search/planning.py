"""The search's planned trials: latency probes, then guided plans checked by a pre-check.

Before the guided planner (``guided``) aims at a speed, the study's latency model is fitted
on this machine: a few structures are pre-checked with the full interleaved look (each width
uniformly at 0/25/50% pruning, and float and int8 layers alternating, which teaches the
model what switching between float and integer kernels costs).

The planner then minimises predicted damage, which makes it seek out whatever the model
underestimates. So every plan aimed at a latency target is pre-checked before it is queued
(latency does not depend on weight values: an export and a short timing); a plan measured
over its target (or far under it: overshooting costs accuracy) teaches the model that
structure, and the rung is solved again with its aim moved by part of the miss, up to
REPLANS times; a rung keeps its least-damage plan measured within target, with a SAFE
margin for the trial's own measurement.
Each plan's queued note says what was predicted and what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.config.settings import RunSettings, SpaceSettings
from autocompress.errors import one_line
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.search import guided
from autocompress.search.sensitivity import (
    CALIBRATION_BATCHES,
    SENSITIVITY_ATTR,
    Sensitivity,
    measure_sensitivity,
    pass_seconds,
)
from autocompress.search.session import _say
from autocompress.study import attrs as trial_attrs
from autocompress.transform.student import build_student
from autocompress.trial.context import SearchContext
from autocompress.trial.runner import TrialRunner

log = logging.getLogger("autocompress")

GUIDED_SHARE = 4  # a search gets one guided plan per this many trials (at least one)
FRONT_SAMPLER = "front"
FRONT_GUIDED_QUEUED = 2  # guided plans the default sampler queues; the rest are candidates
GUIDED_PENDING_ATTR = "guided_pending"  # study attribute: the guided plans not queued
REPLANS = 3  # solve, pre-check the latency-aimed plans, refit, solve again: at most this often
CLOSE_ENOUGH = 0.92  # a plan measured within 92-97% of its latency target is not re-aimed
# A plan counts as within its latency target only this far under it: a trial's own
# measurement differs from its pre-check by ~2% (median over 34 trials of the budgets
# benchmark; up to 9-17% for int8 activations), so a plan pre-checked at 1.0x of the budget
# measured over it about half the time, and the search's best plan was lost that way.
SAFE = 0.97
MARGIN_RANGE = (0.75, 1.1)  # how far the aim may move from the latency target


def enqueue_guided(
    study: Any,
    runner: TrialRunner,
    inventory: Any,
    settings: SpaceSettings,
    run: RunSettings,
    budgets: list[Budget],
    on_start: Callable[[str], None] | None,
) -> None:
    """The sensitivity pass (once per study) and the least-damage plans solved from it,
    checked against their latency targets, queued after the warm starts (one per
    GUIDED_SHARE trials)."""
    ctx = runner.ctx
    try:
        table = _resolve_sensitivity(study, ctx, inventory, run, on_start)
    except Exception as exc:  # a model the pass cannot score still gets searched
        _say(f"sensitivity pass failed ({one_line(exc, typed=True)}); searching without "
             "guided plans", on_start)
        return
    fit_latency_model(runner, inventory, settings)
    plans, measured = _checked_plans(runner, table, inventory, settings, budgets,
                                     max(1, run.trials // GUIDED_SHARE))
    for g in plans:
        lat = ("" if g.predicted_latency_ratio is None
               else f", x{g.predicted_latency_ratio:.2f} of fp32 latency")
        seen = measured.get(g.plan.to_json())
        if seen is not None:
            lat += f" (pre-check x{seen:.2f})"
        _say(f"guided plan {g.name} ({g.target}): {g.plan.summary()}, predicted "
             f"{g.predicted_size_bytes / 1000:.1f} KB{lat}, damage {g.predicted_damage:.3g}",
             on_start)
    chosen = [(g.name, g.plan) for g in plans]
    if run.sampler == FRONT_SAMPLER and len(chosen) > FRONT_GUIDED_QUEUED:
        # the default sampler queues the first rungs; the others become candidates its
        # proposer weighs against moves along the lineages (a 12x or 16x plan cut from the
        # teacher in one go lost 10 points or was stopped early on ResNet-20)
        chosen, pending = chosen[:FRONT_GUIDED_QUEUED], chosen[FRONT_GUIDED_QUEUED:]
        with study_mod.study_lock(study):
            if study.user_attrs.get(GUIDED_PENDING_ATTR) is None:
                study.set_user_attr(GUIDED_PENDING_ATTR, json.dumps(
                    [{"name": name, "plan": plan.to_dict()} for name, plan in pending]))
    if settings.ptq_methods:  # each least-damage plan realised by PTQ first: seconds each
        chosen = space.ptq_twins(chosen, settings) + chosen
    named = [(name, space.plan_to_params(plan, inventory, settings)) for name, plan in chosen]
    study_mod.enqueue_once(study, named, trial_attrs.GUIDED)


def _checked_plans(
    runner: TrialRunner,
    table: Sensitivity,
    inventory: Any,
    settings: SpaceSettings,
    budgets: list[Budget],
    limit: int,
) -> tuple[list[guided.GuidedPlan], dict[str, float]]:
    """Up to ``limit`` plans. Per rung: solve, pre-check a latency-aimed plan, and solve
    again (the model has learned that structure, and the aim moves by the miss) while it
    measured over its target or far under it (overshooting costs accuracy), up to REPLANS
    solves. A rung keeps its least-damage plan measured within target; one never measured
    within it is kept only while it meets the latency budgets (else its trial is rejected)."""
    ctx = runner.ctx
    fp32_bytes = measure.file_size(ctx.fp32_onnx)
    measured: dict[str, float] = {}
    out: list[guided.GuidedPlan] = []
    seen: set[str] = set()
    for rung in guided.rungs(fp32_bytes=fp32_bytes, budgets=budgets,
                             reference_ms=None if ctx.reference is None
                             else ctx.reference.median_ms):
        if len(out) >= limit:
            break
        best: guided.GuidedPlan | None = None
        last: guided.GuidedPlan | None = None
        margin = guided.LATENCY_MARGIN
        for _ in range(REPLANS):
            g = guided.solve_rung(rung, table, inventory, settings, fp32_bytes=fp32_bytes,
                                  predict_latency=ctx.latency_model.predict,
                                  latency_margin=margin)
            if g is None:
                break
            last = g
            if rung.latency_ratio is None:  # a size target: the size model is exact enough
                best = g
                break
            key = g.plan.to_json()
            if key not in measured:
                ratio = _measure(runner, g.plan)
                measured[key] = float("nan") if ratio is None else ratio
            ratio = measured[key]
            if ratio != ratio:  # cannot be timed: its trial will say why
                best = best or g
                break
            within = SAFE * rung.latency_ratio
            if ratio <= within and (best is None or g.predicted_damage < best.predicted_damage):
                best = g
            if CLOSE_ENOUGH * rung.latency_ratio <= ratio <= within:
                break
            # aim again: by the whole miss when over (the plan must fit), by half of it when
            # far under (the refitted model corrects part of it already)
            step = (within / ratio) ** (1.0 if ratio > within else 0.5)
            margin = min(MARGIN_RANGE[1], max(MARGIN_RANGE[0], margin * step))
        if best is None and last is not None and not _breaks_budget(
                measured.get(last.plan.to_json(), 0.0), ctx):
            best = last
        if best is not None and best.plan.to_json() not in seen:
            seen.add(best.plan.to_json())
            out.append(best)
    return out, measured


def _breaks_budget(ratio: float, ctx: SearchContext) -> bool:
    budget = ctx.budget_ratio()
    return budget is not None and ratio > budget


def _measure(runner: TrialRunner, plan: CompressionPlan,
             what: str = "guided plan") -> float | None:
    """The structure's latency ratio to fp32 (a careful pre-check, which the latency model
    also learns from), or None, with a warning naming ``what`` was skipped, when it cannot
    be timed (a guided plan's trial then records why)."""
    try:
        student = build_student(runner.ctx.task, plan, runner.ctx.training.round_to)
        pre = runner.precheck(student, plan, None, runner.ctx.workdir / "pre-checks",
                              careful=True)
    except Exception as exc:
        log.warning("%s %s skipped: %s", what, plan.summary(), one_line(exc, typed=True))
        return None
    return pre.ratio


def fit_latency_model(runner: TrialRunner, inventory: Any, settings: SpaceSettings) -> None:
    """Pre-check the probe structures (module docstring) so the latency model is fitted on
    this machine before the guided plans aim at a speed. Latency does not depend on weight
    values, so each costs an export and a timing (cached by structure, reused by every later
    pre-check); a structure that cannot be timed is left out with a warning."""
    model = runner.ctx.latency_model
    for plan in latency_probes(inventory, settings):
        if model.ready and len(model.observations) >= guided.LATENCY_PROBES:
            return
        _measure(runner, plan, "latency probe")


def latency_probes(inventory: Any, settings: SpaceSettings) -> list[CompressionPlan]:
    """Each width uniformly at 0/25/50% pruning, then the widest width and int8 (or the
    narrowest) alternating layer by layer (unpruned), with uint8 activations where allowed:
    weight-only structures time like float ones, so only these teach the model what integer
    kernels and the switches between float and integer cost here."""
    ratios = sorted({0.0, *(r for r in (0.25, 0.5) if r <= space.prune_high(settings))})
    widths = sorted(set(settings.bits), reverse=True)

    def acts_for(bits: int) -> int:
        return 8 if bits < 32 and 8 in settings.activation_bits else settings.activation_bits[0]

    probes = [space.uniform_plan(inventory, settings, bits=bits, ratio=ratio,
                                 activation_bits=acts_for(bits))
              for bits in widths for ratio in ratios]
    if len(widths) > 1:
        # float and integer layers alternating: int8 where allowed, the planner's usual mix
        narrow = 8 if 8 in widths else widths[-1]
        base = space.uniform_plan(inventory, settings, bits=widths[0],
                                  activation_bits=acts_for(narrow))
        mixed = {name: (narrow if i % 2 else bits) for i, (name, bits)
                 in enumerate(base.bits.items())}
        probes.append(dataclasses.replace(base, bits=mixed))
    return probes


def _resolve_sensitivity(
    study: Any,
    ctx: SearchContext,
    inventory: Any,
    run: RunSettings,
    on_start: Callable[[str], None] | None,
) -> Sensitivity:
    """The study's sensitivity table: measured once (under the study lock, so concurrent
    workers share one), read back on a resume."""
    with study_mod.study_lock(study):
        stored = study.user_attrs.get(SENSITIVITY_ATTR)
        if stored is not None:
            return Sensitivity.from_dict(json.loads(stored))
        table = measure_sensitivity(ctx.task, inventory, ctx.space, ctx.calibration,
                                    training=ctx.training, images=run.sensitivity_images,
                                    seconds=pass_seconds(run.time_limit))
        study.set_user_attr(SENSITIVITY_ATTR, json.dumps(table.to_dict()))
    fragile = table.fragile_layers(min(ctx.space.bits))
    _say(f"sensitivity pass: {len(table.layers)} layers and {len(table.groups)} groups "
         f"scored on {table.images} validation images in {table.seconds:.0f} s"
         + (f" (observers calibrated on {table.calibration_batches} batch(es) to fit "
            f"{pass_seconds(run.time_limit):.0f} s)"
            if table.calibration_batches < min(CALIBRATION_BATCHES, len(ctx.calibration))
            else "")
         + (f"; keep at higher precision: {', '.join(fragile)}" if fragile else "")
         + (f"; {len(table.failed)} choices could not be scored" if table.failed else "")
         + (f"; {len(table.estimated)} layers given the scored layers' median to stay within "
            f"{pass_seconds(run.time_limit):.0f} s" if table.estimated else "")
         + (f"; {len(table.unscored)} smaller groups left unscored to stay within "
            f"{pass_seconds(run.time_limit):.0f} s (their damage estimated from the scored "
            "groups')" if table.unscored else "")
         + f" (autocompress sensitivity --study {run.study})", on_start)
    return table


__all__ = ["FRONT_GUIDED_QUEUED", "FRONT_SAMPLER", "GUIDED_PENDING_ATTR", "GUIDED_SHARE",
           "REPLANS", "enqueue_guided", "fit_latency_model", "latency_probes"]
