"""Proposals from what the study measured: moves around the front, blends of neighbours, each
predicted by the study's surrogate before anything is fine-tuned.

After the warm starts and guided plans, the default proposer (``--sampler front``) derives
each next plan from the measured Pareto front instead of sampling the space blind:

- **shrink**: a front trial made ~``SHRINK`` (``SHRINK_LESS``, ``SHRINK_MORE``) smaller by the
  changes with the least sensitivity damage per byte saved: a group's ratio a grid step up, a
  layer a width down. Its fine-tune inherits the front trial's weights (``trial.lineage``), so
  a high ratio is reached a step at a time along a lineage instead of in one cut;
- **repair**: the front trial's most damaging choice undone a step (a width up, a ratio down),
  then shrunk back to its size by the least damaging changes elsewhere (a better trade at the
  same size), or not (**grow**: larger, more accurate);
- **blend**: between two neighbours on the front, the larger one with the cheaper half of the
  smaller one's differences;
- **fit** (under a budget): a measured plan over the budget, or the uncompressed model,
  brought inside it by the least damage per unit of excess removed (``guided.solve`` from that
  start). Before any trial meets the budget these are the only moves, by predicted accuracy.

Each candidate's accuracy is predicted (``surrogate``) from where its fine-tune will start (the
trial it inherits from, else the teacher) plus the damage it adds; one predicted dominated by
what the study measured is refused (counted, not fine-tuned). Of the rest, the one whose
optimistic prediction adds the most hypervolume to the front (log size vs accuracy, down to
``measured.FLOOR_DROP`` under fp32, or under the best trial within the budgets when that is
lower; sizes down to one shrink past the guided ladder's smallest target) is proposed.
Under a latency budget, candidates the latency model predicts over it are left out, so
moves stay inside it. Torch-free: plans in, a plan out.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autocompress.config.settings import SpaceSettings
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.search import guided
from autocompress.search.dense_table import densify
from autocompress.search.measured import (
    Measured,
    fine_tune_start,
    front_order,
    hypervolume_floor,
    hypervolume_gain,
    measured_trials,
    on_front,
    realised_key,
    smallest_counted,
    structure_key,
)
from autocompress.search.sensitivity import Sensitivity
from autocompress.search.surrogate import Pair, Surrogate, calibrate

SHRINK = 0.85  # a shrink move's size, of its front trial's
SHRINK_MORE = 0.7
# near the edge of what a fine-tune repairs, a 15% step cost ResNet-20 2.8 points from its
# 8.8x plan: a smaller step is offered too, and the surrogate weighs all three
SHRINK_LESS = 0.93
REPAIR_RATIO_STEP = 0.1  # a repaired group's ratio goes down this much
# sizes count down to a shrink past the ladder's last target (measured.smallest_counted):
# with FLOOR_DROP as low as it is, area further out outweighed repairs at the targets
EXTENT_PAST_LADDER = 1 / SHRINK
FRONT_SOURCES = 8  # trials moves are derived from: the front's, then the nearest below it
LOCAL_SCALE_CAP = 1.25  # how far a latency error may move the aim of moves (_latency_aim)
RECENT_CHECKS = 5  # pre-checks whose prediction error aims a fit from the uncompressed model
FIT_SOURCES = 3  # measured plans over the budget (most accurate first) fitted inside it

Choice = dict[tuple[str, str], float]


@dataclass(frozen=True)
class Proposal:
    kind: str  # shrink | repair | grow | blend | guided
    parent: int  # the trial it was derived from (a guided plan: the one it inherits, or -1)
    plan: CompressionPlan
    predicted_accuracy: float
    predicted_size: float
    gain: float  # hypervolume the optimistic prediction adds
    name: str | None = None  # a guided plan's rung ("guided-12x")


@dataclass(frozen=True)
class Outcome:
    proposal: Proposal | None
    refused: int  # candidates predicted dominated
    candidates: int
    surrogate: Surrogate


class Proposer:
    """Moves, blends and the surrogate over one study's sensitivity table."""

    def __init__(self, sens: Sensitivity, inventory: Inventory, settings: SpaceSettings, *,
                 fp32_bytes: float, fp32_accuracy: float,
                 predict_latency: guided.LatencyPredictor | None = None,
                 latency_budget: float | None = None, size_budget: float | None = None,
                 floor: float = 0.0,
                 latency_checks: Callable[[], Sequence[tuple[float, float]]] | None = None,
                 round_to: int = 8) -> None:
        self.settings = settings
        self.inventory = inventory
        self.channels = {g.name: g.channels for g in inventory.groups}  # realised_key's
        self.round_to = round_to
        self.fp32_bytes = fp32_bytes
        self.fp32_accuracy = fp32_accuracy
        self.latency_budget = latency_budget
        self.size_budget = size_budget
        self.floor = floor  # a trial measured below it is no parent (trial.lineage)
        # the ratios (x smaller than fp32) the hypervolume counts sizes to, one shrink past
        self.targets = [f for kind, f in guided.LADDER if kind == "size"] + (
            [] if size_budget is None else [fp32_bytes / size_budget])
        self.latency_checks = latency_checks  # (predicted, measured) pre-checks, oldest first
        dense = densify(sens, settings)
        self.problems = {acts: guided.Problem(dense, settings, fp32_bytes, acts,
                                              predict_latency, inventory)
                         for acts in settings.activation_bits}

    def propose(self, trials: Sequence[Measured], tried: set[str],
                guided: Sequence[tuple[str, CompressionPlan]] = (),
                over_budget: Sequence[Measured] = ()) -> Outcome:
        """The next plan (module docstring); ``tried``: ``keys`` of the plans already run;
        ``guided``: (rung, plan) solved for the ladder but not queued, weighed like moves;
        ``over_budget``: measured trials outside the budgets (``trials`` are those inside)."""
        surrogate = calibrate(self.pairs([*trials, *over_budget]), self.fp32_accuracy)
        points = [(t.size, t.accuracy) for t in trials]
        scales = self._size_scales([*trials, *over_budget])
        floor = hypervolume_floor(trials, self.fp32_accuracy, budgeted=(
            self.latency_budget is not None or self.size_budget is not None))
        smallest = smallest_counted(trials, self.targets, fp32_bytes=self.fp32_bytes,
                                    fp32_accuracy=self.fp32_accuracy, extent=EXTENT_PAST_LADDER)
        best: Proposal | None = None
        refused = seen = 0
        candidates = [(kind, parent, plan, None) for kind, parent, plan
                      in [*self._candidates(trials), *self._fits(over_budget)]]
        for name, plan in guided:
            start = fine_tune_start(plan, -1, trials, self.floor)
            candidates.append(("guided", -1 if start is None else start.number, plan, name))
        for kind, parent, plan, name in candidates:
            keys = self.keys(plan)
            if keys & tried:
                continue
            tried = tried | keys
            seen += 1
            proposal = self._predicted(kind, parent, plan, [*trials, *over_budget], surrogate,
                                       points, (scales, floor, smallest))
            if proposal is None:
                continue
            proposal = dataclasses.replace(proposal, name=name)
            if surrogate.dominated(proposal.predicted_accuracy, proposal.predicted_size,
                                   points):
                refused += 1
                continue
            if best is None or proposal.gain > best.gain:
                best = proposal
        return Outcome(best if best is not None and best.gain > 0 else None, refused, seen,
                       surrogate)

    def keys(self, plan: CompressionPlan) -> set[str]:
        """The plan as specified and as built (``realised_key``), for "already tried"."""
        return {structure_key(plan), realised_key(plan, self.channels, self.round_to)}

    def pairs(self, trials: Sequence[Measured]) -> list[Pair]:
        """Calibration pairs: each trial fine-tuned for the study's steps, from its start."""
        by_number = {t.number: t for t in trials}
        out = []
        for t in trials:
            damage = self.damage(t.plan)
            if damage is None or not t.default_steps or t.plan.is_ptq:
                continue
            start = by_number.get(t.inherited_from) if t.inherited_from is not None else None
            start_damage = None if start is None else self.damage(start.plan)
            if t.inherited_from is not None and (start is None or start_damage is None):
                continue  # its start is not priced here: no pair rather than a wrong one
            if start is None or start_damage is None:
                out.append(Pair(damage, self.fp32_accuracy - t.accuracy))
            else:
                out.append(Pair(damage - start_damage, start.accuracy - t.accuracy))
        return out

    def damage(self, plan: CompressionPlan) -> float | None:
        found = self._choice(plan)
        return None if found is None else found[0].damage(found[1])

    # -- candidates -----------------------------------------------------------------------

    def _candidates(self, trials: Sequence[Measured]) -> list[tuple[str, int, CompressionPlan]]:
        front = front_order(trials)[:FRONT_SOURCES]
        members = {f.number for f in on_front(trials)}
        nondominated = [t for t in front if t.number in members]
        out: list[tuple[str, int, CompressionPlan]] = []
        for t in front:
            found = self._choice(t.plan)
            if found is None:
                continue
            problem, choice = found
            size = problem.size(choice)
            aim = self._latency_aim(problem, choice, t)
            for kind, moved in (("shrink", self._shrink(problem, choice, size * SHRINK_LESS,
                                                        aim=aim)),
                                ("shrink", self._shrink(problem, choice, size * SHRINK, aim=aim)),
                                ("shrink", self._shrink(problem, choice, size * SHRINK_MORE,
                                                        aim=aim)),
                                *self._repairs(problem, choice, size, aim)):
                if moved is not None and moved != choice:
                    out.append((kind, t.number, self._plan(t.plan, moved)))
        ordered = sorted(nondominated, key=lambda t: t.size)
        for small, large in itertools.pairwise(ordered):
            blended = self._blend(large, small)
            if blended is not None:
                out.append(("blend", large.number, blended))
        return out

    def _fits(self, over_budget: Sequence[Measured]) -> list[tuple[str, int, CompressionPlan]]:
        """Under a budget: the most accurate measured plans over it, and the uncompressed
        model (parent -1), each brought inside it by least damage per excess removed."""
        if self.latency_budget is None and self.size_budget is None:
            return []
        size = None if self.size_budget is None else self.size_budget * guided.SIZE_MARGIN
        out: list[tuple[str, int, CompressionPlan]] = []
        for problem in self.problems.values():
            fitted = guided.solve(problem, guided.Targets(size, self._latency_aim()))
            if fitted is not None:
                base = dataclasses.replace(CompressionPlan(), activation_bits=problem.acts)
                out.append(("fit", -1, self._plan(base, fitted)))
        for t in sorted(over_budget, key=lambda t: -t.accuracy)[:FIT_SOURCES]:
            found = self._choice(t.plan)
            if found is None:
                continue
            targets = guided.Targets(size, self._latency_aim(*found, t))
            fitted = guided.solve(found[0], targets, start=found[1])
            if fitted is not None:
                out.append(("fit", t.number, self._plan(t.plan, fitted)))
        return out

    def _latency_aim(self, problem: guided.Problem | None = None, choice: Choice | None = None,
                     source: Measured | None = None) -> float | None:
        """The latency ratio the model's prediction must stay under for moves from
        ``source``: the budget with its margin, scaled by the model's error (one linear fit
        over the whole space: on the demo at 0.55x it called plans over the budget that
        measured inside it, and no move was proposed)."""
        if self.latency_budget is None:
            return None
        aim = self.latency_budget * guided.LATENCY_MARGIN
        # the model's error on the latest pre-checks and at the source: the tighter wins
        # (fits aimed by one source's error alone measured over the budget 40 times)
        recent = [p / m for p, m in (self.latency_checks() if self.latency_checks else ())
                  [-RECENT_CHECKS:] if m > 0 and p > 0]
        scales = [sorted(recent)[len(recent) // 2]] if recent else []
        if problem is not None and choice is not None and source is not None and (
                source.latency_ratio):
            scales.append(problem.latency_ratio(choice) / source.latency_ratio)
        return aim * min(max(min(scales, default=1.0), 1 / LOCAL_SCALE_CAP), LOCAL_SCALE_CAP)

    def _shrink(self, problem: guided.Problem, choice: Choice, target: float,
                frozen: tuple[str, str] | None = None, *,
                aim: float | None = None) -> Choice | None:
        """Greedy least damage per byte saved from ``choice`` until ``target`` bytes."""
        choice = dict(choice)
        size, damage = problem.size(choice), problem.damage(choice)
        start_size = size
        while size > target:
            best: tuple[float, Choice, float, float] | None = None
            for unit, value in choice.items():
                options = problem.options(*unit)
                here = options.index(value)
                if unit == frozen or here + 1 >= len(options):
                    continue
                step = dict(choice)
                step[unit] = options[here + 1]
                saved = size - problem.size(step)
                if saved <= 0 or not self._within_budget(problem, step, aim):
                    continue
                score = (problem.damage(step) - damage) / saved
                if best is None or score < best[0]:
                    best = (score, step, size - saved, problem.damage(step))
            if best is None:  # the space ends first: as far as it goes, if anywhere
                return choice if size < start_size else None
            _, choice, size, damage = best
        return choice

    def _repairs(self, problem: guided.Problem, choice: Choice, size: float,
                 aim: float | None) -> list[tuple[str, Choice | None]]:
        # a unit at its first option (the widest width the space has, ratio 0) has nothing
        # to undo
        damaging = [(problem.damage({u: v}), u) for u, v in choice.items()
                    if v != problem.options(*u)[0]]
        if not damaging:
            return []
        _, unit = max(damaging)
        options = problem.options(*unit)
        value = choice[unit]
        if unit[0] == "layer":
            back = options[options.index(value) - 1]
        else:
            back = max((o for o in options if o <= value - REPAIR_RATIO_STEP + 1e-9),
                       default=0.0)
        grown = {**choice, unit: back}
        return [("repair", self._shrink(problem, grown, size, frozen=unit, aim=aim)),
                ("grow", grown if self._within_budget(problem, grown, aim) else None)]

    def _blend(self, large: Measured, small: Measured) -> CompressionPlan | None:
        a, b = self._choice(large.plan), self._choice(small.plan)
        if a is None or b is None or a[0] is not b[0]:
            return None
        problem, choice = a
        differing = [u for u in choice if choice[u] != b[1][u]]
        if len(differing) < 2:
            return None

        def cost(unit: tuple[str, str]) -> float:
            step = {**choice, unit: b[1][unit]}
            saved = problem.size(choice) - problem.size(step)
            return (problem.damage(step) - problem.damage(choice)) / saved if saved > 0 else 1e9

        cheap = sorted(differing, key=cost)[: len(differing) // 2]
        blended = {**choice, **{u: b[1][u] for u in cheap}}
        aim = self._latency_aim(problem, choice, large)
        return (self._plan(large.plan, blended) if self._within_budget(problem, blended, aim)
                else None)

    def _within_budget(self, problem: guided.Problem, choice: Choice,
                       aim: float | None) -> bool:
        """Inside the size budget and under the latency ``aim`` (``_latency_aim``)."""
        if self.size_budget is not None and (
                problem.size(choice) > self.size_budget * guided.SIZE_MARGIN):
            return False
        return aim is None or problem.latency_ratio(choice) <= aim

    # -- plans and predictions ------------------------------------------------------------

    def _choice(self, plan: CompressionPlan) -> tuple[guided.Problem, Choice] | None:
        """The plan as the problem's choice (None: a width or ratio the table cannot price)."""
        problem = self.problems.get(plan.activation_bits)
        if problem is None or plan.sparse:
            return None
        choice: Choice = {}
        for kind, name in problem.units():
            value = (float(plan.bits_for(name)) if kind == "layer"
                     else round(plan.ratio_for(name), 6))
            options = problem.options(kind, name)
            near = min(options, key=lambda o, v=value: abs(o - v))
            if abs(near - value) > 1e-6:
                return None
            choice[(kind, name)] = near
        return problem, choice

    def _plan(self, like: CompressionPlan, choice: Choice) -> CompressionPlan:
        bits = dict(like.bits)
        prune = dict(like.prune)
        for (kind, name), value in choice.items():
            if kind == "layer":
                bits[name] = int(value)
            else:
                prune[name] = float(value)
        return dataclasses.replace(space.as_qat(like), bits=bits, prune=prune,
                                   finetune_steps=self.settings.finetune_steps)

    def _predicted(self, kind: str, parent: int, plan: CompressionPlan,
                   trials: Sequence[Measured], surrogate: Surrogate,
                   points: list[tuple[float, float]],
                   scale: tuple[dict[int, float], float, float]) -> Proposal | None:
        """``scale``: ``_size_scales``, the hypervolume floor and smallest size counted."""
        scales, floor, smallest = scale
        found = self._choice(plan)
        if found is None:
            return None
        problem, choice = found
        damage = problem.damage(choice)
        start = fine_tune_start(plan, parent, trials, self.floor)
        start_damage = None if start is None else self.damage(start.plan)
        if start is None or start_damage is None:
            predicted = surrogate.predict(damage)
        else:
            predicted = surrogate.predict(damage, start_accuracy=start.accuracy,
                                          start_damage=start_damage)
        size = problem.size(choice) * scales.get(parent, scales[-1])
        optimistic = predicted + 0.5 * surrogate.spread
        if not points:  # nothing inside the budgets yet: the most accurate fit comes first
            return Proposal(kind, parent, plan, predicted, size, 1.0 + optimistic)
        gain = hypervolume_gain(points, (size, optimistic), fp32_bytes=self.fp32_bytes,
                                floor=floor, ceiling=self.fp32_accuracy,
                                smallest=smallest)
        return Proposal(kind, parent, plan, predicted, size, gain)

    def _size_scales(self, trials: Sequence[Measured]) -> dict[int, float]:
        """Measured over modelled file size (scales and zero points the model leaves out) of
        each trial the table can price, and under -1 their median. A move's size is predicted
        at its source's (with the median alone, the digits demo put a shrink of a measured
        29.8x plan at 26.2x, larger than its source, so no move from it was proposed)."""
        out = {t.number: t.size / found[0].size(found[1]) for t in trials
               if (found := self._choice(t.plan)) is not None and found[0].size(found[1]) > 0}
        ratios = sorted(out.values())
        return {**out, -1: ratios[len(ratios) // 2] if ratios else 1.0}

__all__ = ["Measured", "Outcome", "Proposal", "Proposer", "densify", "hypervolume_gain",
           "measured_trials", "structure_key"]
