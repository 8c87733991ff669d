"""Guided proposals: least-damage plans at a ladder of targets, solved from the sensitivity
table (ModelOpt's AutoQuantize and HAQ in spirit: score every choice once, then solve).

Damage is modelled as the sum of the single-choice KL scores (``sensitivity``); a plan's
file size as the fp32 file minus what each layer's weights save at its width and kept
share (group shares multiply: a group shrinks its layers' outputs and its consumers'
inputs); its latency ratio by the study's latency model on the MACs left at each width, or,
before that model exists, by a MAC-share proxy. The solver is the greedy one for a
multiple-choice knapsack: from the uncompressed plan, take the single change with the least
damage per unit of target violation removed until every target is met, then undo any
change no longer needed. Torch-free; the plans it returns are plain ``CompressionPlan``s
that go through the same pre-check, fine-tune and measurement as any trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autocompress.config.budgets import Budget
from autocompress.config.settings import SpaceSettings
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.runtime.latency_model import (
    LayerCost,
    cost_features,
    is_weight_layer,
    output_elements,
)
from autocompress.search.sensitivity import Sensitivity

# Targets, in the order their plans are queued (a short search gets the first few):
# ("size", k) k x smaller than the fp32 file, ("speed", k) k x faster than fp32.
LADDER = (("size", 8.0), ("speed", 1.5), ("size", 4.0), ("size", 16.0), ("speed", 2.0),
          ("size", 12.0))
LATENCY_PROBES = 10  # structures pre-checked to fit the latency model before planning
# Aim under a latency target: the model errs by a few percent (benchmarks/latency_model_fit.py);
# the search pre-checks each plan and re-aims by the miss (``planning``).
LATENCY_MARGIN = 0.97
# aim under a size target: per-channel scales and zero points are not in the size model
# (ResNet-20 at int4: ~3% of the file)
SIZE_MARGIN = 0.97
# Before the latency model is fitted: ratio ~ a fixed 0.1 + 0.9 x the MAC share, int8 MACs
# 0.8x as costly as float, int4 behind uint8 activations 1.5x, weight-only at float.
# Measured on ResNet-20, batch 1: uniform int8 0.78-0.85x of fp32; every group pruned 30%
# (MAC share 0.49) 0.555x, 50% (0.25) 0.36x.
_PROXY_COST = {32: 1.0, 8: 0.8, 4: 1.5}
_PROXY_FIXED = 0.1


@dataclass(frozen=True)
class GuidedPlan:
    name: str  # e.g. "guided-8x", "guided-budget"
    plan: CompressionPlan
    predicted_damage: float
    predicted_size_bytes: float
    predicted_latency_ratio: float | None
    target: str  # what it was solved for, in words
    latency_target: float | None = None  # the ratio to fp32 it must meet (before the margin)


LatencyPredictor = Callable[[list[float]], float | None]


@dataclass(frozen=True)
class _Targets:
    size_bytes: float | None
    latency_ratio: float | None


class _Problem:
    """The units (layers with widths, groups with ratios) and the size/latency/damage model."""

    def __init__(self, sens: Sensitivity, settings: SpaceSettings, fp32_bytes: float,
                 activation_bits: int, predict: LatencyPredictor | None,
                 inventory: Inventory) -> None:
        self.sens = sens
        self.acts = activation_bits
        self.predict = predict
        self.layers = list(sens.layers)
        widths = sorted({b for b in settings.bits}, reverse=True)
        self.layer_options = {
            name: [b for b in widths if b == 32 or str(b) in sens.layers[name]["bits"]]
            for name in self.layers
        }
        self.groups = list(sens.groups)
        self.group_options = {
            name: [0.0, *sorted(float(r) for r in sens.groups[name]["ratios"])]
            for name in self.groups
        }
        weight_bytes = sum(4.0 * sens.layers[n]["params"] for n in self.layers)
        self.overhead = max(fp32_bytes - weight_bytes, 0.0)
        # What the latency model counts: every convolution and linear layer in graph order
        # (name, MACs, output elements), and the groups whose output channels each loses.
        self.weight_layers = [(info.name, float(info.flops), output_elements(info))
                              for info in inventory.layers
                              if is_weight_layer(info.type) and info.flops]
        self.total_macs = sum(m for _, m, _ in self.weight_layers)
        self.total_outputs = sum(o for _, _, o in self.weight_layers)
        self.output_groups: dict[str, list[str]] = {}
        for group in inventory.groups:
            if group.name in sens.groups:
                for member in group.members:
                    self.output_groups.setdefault(member, []).append(group.name)

    def units(self) -> list[tuple[str, str]]:
        return [("layer", n) for n in self.layers] + [("group", g) for g in self.groups]

    def options(self, kind: str, name: str) -> list[float]:
        return ([float(b) for b in self.layer_options[name]] if kind == "layer"
                else self.group_options[name])

    def kept(self, choice: dict[tuple[str, str], float]) -> dict[str, float]:
        """Share of each layer's weights kept (quantizable layers and every weight layer)."""
        shares = dict.fromkeys([*self.layers, *(n for n, _, _ in self.weight_layers)], 1.0)
        for group in self.groups:
            ratio = choice[("group", group)]
            if ratio > 0:
                kept = self.sens.groups[group]["ratios"][f"{ratio:g}"]["kept"]
                for layer, share in kept.items():
                    if layer in shares:
                        shares[layer] *= float(share)
        return shares

    def damage(self, choice: dict[tuple[str, str], float]) -> float:
        total = 0.0
        for (kind, name), value in choice.items():
            if kind == "layer" and value < 32:
                total += float(self.sens.layers[name]["bits"][str(int(value))]["kl"])
            elif kind == "group" and value > 0:
                total += float(self.sens.groups[name]["ratios"][f"{value:g}"]["kl"])
        return total

    def size(self, choice: dict[tuple[str, str], float],
             kept: dict[str, float] | None = None) -> float:
        kept = self.kept(choice) if kept is None else kept
        weights = sum(self.sens.layers[n]["params"] * kept[n] * choice[("layer", n)] / 8.0
                      for n in self.layers)
        return self.overhead + weights

    def latency_ratio(self, choice: dict[tuple[str, str], float],
                      kept: dict[str, float] | None = None) -> float:
        kept = self.kept(choice) if kept is None else kept
        costs = []
        for name, macs, outputs in self.weight_layers:
            bits = 32 if self.acts >= 32 else int(choice.get(("layer", name), 32))
            # A member of a pruned group loses output channels; its kept weight share under
            # its own group is its kept output share.
            out_share = 1.0
            for group in self.output_groups.get(name, []):
                ratio = choice[("group", group)]
                if ratio > 0:
                    out_share *= float(self.sens.groups[group]["ratios"][f"{ratio:g}"]["kept"]
                                       .get(name, 1.0))
            costs.append(LayerCost(macs * kept[name], outputs * out_share, bits))
        features = cost_features(costs, self.total_macs, self.total_outputs)
        predicted = self.predict(features) if self.predict is not None else None
        if predicted is not None:
            return predicted
        by_width = {32: features[1], 8: features[2], 4: features[3]}
        return _PROXY_FIXED + (1 - _PROXY_FIXED) * sum(
            _PROXY_COST[w] * share for w, share in by_width.items())

    def violation(self, choice: dict[tuple[str, str], float], targets: _Targets) -> float:
        kept = self.kept(choice)
        total = 0.0
        if targets.size_bytes is not None:
            total += max(0.0, self.size(choice, kept) / targets.size_bytes - 1.0)
        if targets.latency_ratio is not None:
            total += max(0.0, self.latency_ratio(choice, kept) / targets.latency_ratio - 1.0)
        return total


def solve(problem: _Problem, targets: _Targets,
          start: dict[tuple[str, str], float] | None = None
          ) -> dict[tuple[str, str], float] | None:
    """Greedy least damage per unit of violation removed, from the uncompressed model or from
    ``start`` (a measured plan brought inside a budget: no unit goes back past where it
    started, so its kept channels nest in the start's and its fine-tune can inherit them);
    None when the targets cannot be met within the space."""
    first = {(kind, name): problem.options(kind, name)[0] for kind, name in problem.units()}
    choice = dict(first if start is None else start)
    lowest = dict(choice)
    violation = problem.violation(choice, targets)
    damage = problem.damage(choice)
    while violation > 1e-9:
        best: tuple[float, tuple[str, str], float, float, float] | None = None
        for unit in choice:
            options = problem.options(*unit)
            here = options.index(choice[unit])
            for option in options[here + 1:]:
                trial = dict(choice)
                trial[unit] = option
                v = problem.violation(trial, targets)
                gain = violation - v
                if gain <= 1e-12:
                    continue
                d = problem.damage(trial)
                score = (d - damage) / gain
                if best is None or score < best[0]:
                    best = (score, unit, option, v, d)
        if best is None:
            return None
        _, unit, option, violation, damage = best
        choice[unit] = option
    # Undo what overshot: the last steps may have made earlier ones unnecessary.
    for unit in sorted(choice, key=lambda u: -_unit_damage(problem, u, choice[u])):
        options = problem.options(*unit)
        for option in options[options.index(lowest[unit]): options.index(choice[unit])]:
            trial = dict(choice)
            trial[unit] = option
            if problem.violation(trial, targets) <= 1e-9:
                choice = trial
                break
    return choice


def _unit_damage(problem: _Problem, unit: tuple[str, str], value: float) -> float:
    return problem.damage({unit: value})


@dataclass(frozen=True)
class Rung:
    """One target the planner solves for: a file size and/or a latency ratio to fp32."""

    name: str  # e.g. "guided-8x"
    what: str  # in words
    size_bytes: float | None
    latency_ratio: float | None


def rungs(*, fp32_bytes: float, budgets: Sequence[Budget],
          reference_ms: float | None) -> list[Rung]:
    """The study's budgets (when any) and each rung of LADDER, each also within the
    budgets, in the order their plans are queued; a speed rung no faster than the latency
    budget is left out (it would be solved as the budget rung again)."""
    size_budget = min((b.value for b in budgets if b.kind == "size"), default=None)
    budget_ratio = None
    latency_limits = [b.value for b in budgets if b.kind == "latency"]
    if latency_limits and reference_ms:
        budget_ratio = min(latency_limits) / reference_ms
    within = " within the budgets" if budgets else ""
    out: list[Rung] = []
    if budgets:
        out.append(Rung("guided-budget", "the budgets", size_budget, budget_ratio))
    for kind, factor in LADDER:
        if kind == "size":
            size = fp32_bytes / factor
            out.append(Rung(f"guided-{factor:g}x", f"{factor:g}x smaller than fp32{within}",
                            size if size_budget is None else min(size, size_budget),
                            budget_ratio))
        else:
            ratio = 1 / factor
            if budget_ratio is not None and ratio >= budget_ratio:
                # capped at the budget it is the budget rung again: one plan, not two
                continue
            out.append(Rung(f"guided-{factor:g}x-faster", f"{factor:g}x faster than fp32{within}",
                            size_budget,
                            ratio if budget_ratio is None else min(ratio, budget_ratio)))
    return out


def solve_rung(
    rung: Rung,
    sens: Sensitivity,
    inventory: Inventory,
    settings: SpaceSettings,
    *,
    fp32_bytes: float,
    predict_latency: LatencyPredictor | None = None,
    latency_margin: float = LATENCY_MARGIN,
) -> GuidedPlan | None:
    """The least-damage plan for one rung, aiming ``latency_margin`` x under its latency
    target; None when the space cannot reach it or the uncompressed model already does."""
    aim = _Targets(None if rung.size_bytes is None else rung.size_bytes * SIZE_MARGIN,
                   None if rung.latency_ratio is None else rung.latency_ratio * latency_margin)
    best = _best_over_activations(sens, settings, fp32_bytes, predict_latency, aim, inventory)
    if best is None:
        return None
    problem, choice = best
    if not any(v < 32 if kind == "layer" else v > 0 for (kind, _), v in choice.items()):
        return None  # the uncompressed model already meets it: the baselines cover that
    kept = problem.kept(choice)
    return GuidedPlan(
        name=rung.name, plan=_to_plan(choice, settings, problem.acts, inventory),
        predicted_damage=problem.damage(choice),
        predicted_size_bytes=problem.size(choice, kept),
        predicted_latency_ratio=problem.latency_ratio(choice, kept),
        target=rung.what, latency_target=rung.latency_ratio,
    )


def propose(
    sens: Sensitivity,
    inventory: Inventory,
    settings: SpaceSettings,
    *,
    fp32_bytes: float,
    budgets: Sequence[Budget],
    reference_ms: float | None,
    predict_latency: LatencyPredictor | None = None,
    limit: int | None = None,
) -> list[GuidedPlan]:
    """Least-damage plans for every rung (``rungs``), solved once from the model as it
    stands; duplicates, unreachable targets and plans that compress nothing are left out.
    (The search checks each latency-aimed plan by a pre-check: ``planning``.)"""
    out: list[GuidedPlan] = []
    seen: set[str] = set()
    for rung in rungs(fp32_bytes=fp32_bytes, budgets=budgets, reference_ms=reference_ms):
        plan = solve_rung(rung, sens, inventory, settings, fp32_bytes=fp32_bytes,
                          predict_latency=predict_latency)
        if plan is None or plan.plan.to_json() in seen:
            continue
        seen.add(plan.plan.to_json())
        out.append(plan)
        if limit is not None and len(out) >= limit:
            break
    return out


def _best_over_activations(
    sens: Sensitivity, settings: SpaceSettings, fp32_bytes: float,
    predict: LatencyPredictor | None, targets: _Targets, inventory: Inventory,
) -> tuple[_Problem, dict[tuple[str, str], float]] | None:
    """A plan has one activation mode: solve under each the space allows, keep the least
    predicted damage (ties, common since int4 is scored weight-only: the faster plan)."""
    best: tuple[tuple[float, float], _Problem, dict[tuple[str, str], float]] | None = None
    for acts in settings.activation_bits:
        problem = _Problem(sens, settings, fp32_bytes, acts, predict, inventory)
        choice = solve(problem, targets)
        if choice is None:
            continue
        rank = (round(problem.damage(choice), 9), problem.latency_ratio(choice))
        if best is None or rank < best[0]:
            best = (rank, problem, choice)
    return None if best is None else (best[1], best[2])


def _to_plan(choice: dict[tuple[str, str], float], settings: SpaceSettings, acts: int,
             inventory: Inventory) -> CompressionPlan:
    """The chosen options as a plan of the search space (every searchable layer and group
    named, as ``space.suggest_plan`` would)."""
    base = space.uniform_plan(inventory, settings, bits=32, activation_bits=acts)
    bits = dict(base.bits)
    prune = dict(base.prune)
    for (kind, name), value in choice.items():
        if kind == "layer" and name in bits:
            bits[name] = int(value)
        elif kind == "group" and name in prune:
            prune[name] = float(value)
    return CompressionPlan(
        bits=bits, prune=prune, activation_bits=acts, kd_temperature=base.kd_temperature,
        kd_alpha=base.kd_alpha, finetune_steps=base.finetune_steps,
        learning_rate=base.learning_rate,
    )


# what the proposer (``proposals``) prices moves with and fits plans inside budgets by
Problem = _Problem
Targets = _Targets

__all__ = ["LADDER", "GuidedPlan", "Problem", "Rung", "Targets", "propose", "rungs", "solve",
           "solve_rung"]
