"""Multi-fidelity: the plans that earned it are fine-tuned again, longer, as linked trials.

Successive halving in spirit (Hyperband, ASHA): every candidate gets the short fine-tune;
when a run's search trials are done, the front's members that add the most hypervolume
are retrained with ``promote_factor`` x their steps (a second rung, factor squared, for
plans already promoted once), each as a new trial with the same plan, its own file and
measurements and the user attribute ``parent_trial``. The front, ``show``, the dashboard
and ``export --best`` then count each plan once, at its most-trained trial
(``pareto.most_trained``). Under budgets the most accurate plan within them goes first,
with as much of the effort as the last rung allows: it is what ``export --best`` delivers.
Without budgets, the most accurate plan at each target of the guided ladder (8x smaller,
1.5x faster, ...) goes before the rest: hypervolume alone favours the front's smallest,
least accurate plans, whose retrains rarely reach the accuracy anyone deploys.

The effort is a share of the run's (``PromotionSettings.share``: 0.25, 0.5 under
budgets), in units of one short fine-tune: ``share x trials`` without a time limit; with
``--time-limit``, the search part stops at ``1 - share`` of it and promotions use what is
left, costed by the run's own mean time per short trial, planned again after each batch
while the time lasts (a retrained plan may earn the next rung); what is too little for one
more promotion lengthens the chosen ones (``stretch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autocompress.config.settings import PromotionSettings
from autocompress.results import metrics
from autocompress.results.pareto import (
    fp32_record,
    hypervolume_contributions,
    most_trained,
    parent_of,
    pareto_front,
)
from autocompress.search.guided import LADDER
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord

MAX_RUNGS = 2  # x factor, then x factor^2; longer repairs are `autocompress refine`'s job
# a calibration-only trial's first fine-tune: at least this share of a short one (steps)
MIN_FIRST_FINETUNE = 0.1
BUDGET_FIRST = 1  # under budgets, this many of the most accurate plans are retrained first


@dataclass(frozen=True)
class Promotion:
    parent: int
    steps: int  # fine-tune steps of the retrain
    rung: int  # 1: factor x the search's steps, 2: factor^2 x
    cost: float  # in short fine-tunes (the search's finetune_steps)


def fidelity(record: TrialRecord, settings: PromotionSettings) -> float:
    """The record's fine-tune steps over the search's (1 for an ordinary trial)."""
    steps = record.plan.get("finetune_steps")
    if not steps or not settings.finetune_steps:
        return 1.0
    return float(steps) / settings.finetune_steps


def plan_promotions(
    records: Sequence[TrialRecord],
    settings: PromotionSettings,
    *,
    effort: float,
    reference_size: float,
    stretch: bool = False,
) -> list[Promotion]:
    """Which plans to retrain within ``effort`` short fine-tunes: the most accurate plan at
    each target of the guided ladder (``_ladder_picks``, on the front or not), then the
    front's members, most hypervolume first; under budgets instead, the most accurate plan
    within them first, on the front or not, with up to the last rung's steps. Baselines
    (nothing fine-tuned), plans already retrained (or being retrained) and plans at the last
    rung are left out.

    ``stretch`` (under a time limit): the effort is time that is lost when not spent, so
    what the rungs leave over (less than one more promotion) lengthens the chosen retrains,
    shared equally, up to the last rung's steps each. Short trials run in that leftover
    instead would never be retrained, and the deliverable is a retrained plan."""
    if settings.share <= 0 or settings.finetune_steps == 0 or effort <= 0:
        return []
    factor = settings.factor
    ranked, top = _ranked(records, settings, reference_size)
    out: list[Promotion] = []
    left = effort
    for record in ranked:
        level = fidelity(record, settings)
        rung = 1 if level < factor else 2
        if level >= factor**MAX_RUNGS:
            continue
        cost = min(level * factor, float(factor**MAX_RUNGS))
        if record.attrs.get(trial_attrs.FIDELITY) == "calibration" and cost > left + 1e-9:
            # never fine-tuned, and its rung does not fit: a first fine-tune of what is left
            # (a real-size model's calibration-only search leaves minutes, not rungs)
            cost = min(1.0, left)
            if cost < MIN_FIRST_FINETUNE:
                continue
        if cost > left + 1e-9:
            continue
        if settings.under_budgets and record in top:
            cost, rung = _concentrated(cost, left, settings)
        steps = round(cost * settings.finetune_steps)
        out.append(Promotion(parent=record.number, steps=steps, rung=rung, cost=cost))
        left -= cost
    if stretch:
        out = _stretched(out, left, settings)
    return out


def _ranked(
    records: Sequence[TrialRecord], settings: PromotionSettings, reference_size: float
) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """The plans in the order they are considered for a retrain (see ``plan_promotions``),
    and the budget-first ones among them (empty without budgets)."""
    has_child = {parent_of(r) for r in records if parent_of(r) is not None}
    top: list[TrialRecord] = []
    front = pareto_front(records)
    gains = hypervolume_contributions(records, reference_size)
    ranked = sorted(
        (r for r in front if r.baseline is None and r.number not in has_child),
        key=lambda r: (-gains.get(r.number, 0.0), r.number),
    )
    if settings.under_budgets:
        # Under budgets the most accurate plan within them is what `export --best` delivers,
        # the candidate the user came for: it is retrained first, with as much of the effort
        # as the last rung allows (``_concentrated``), then the rest by hypervolume. It is
        # drawn from every plan measured within the budgets, not only the size front. One
        # plan, not two: in the budgets benchmark (ResNet-20 at 0.6x, 2 seeds) the two most
        # accurate plans after 150 steps kept their order after 650-700 steps each (or tied
        # within 0.1 point), while doubling one retrain's steps gains ~0.4-0.5 point
        # (600 -> 1200 steps: -1.32 -> -0.91 points of test accuracy).
        within = _retrainable(records, settings, has_child)
        top = sorted(within, key=lambda r: (-(r.accuracy or 0.0), r.number))[:BUDGET_FIRST]
        ranked = top + [r for r in ranked if r not in top]
    else:
        picks = _ladder_picks(records, settings, has_child)
        ranked = picks + [r for r in ranked if r not in picks]
    return ranked, top


def _retrainable(records: Sequence[TrialRecord], settings: PromotionSettings,
                 has_child: set[int | None]) -> list[TrialRecord]:
    """Plans that may be retrained: measured and feasible at their most-trained trial, not
    a baseline, not retrained already, below the last rung."""
    return [r for r in most_trained(records)
            if r.measured and r.feasible and r.baseline is None and r.number not in has_child
            and fidelity(r, settings) < settings.factor**MAX_RUNGS]


def _ladder_picks(records: Sequence[TrialRecord], settings: PromotionSettings,
                  has_child: set[int | None]) -> list[TrialRecord]:
    """Per target of the guided ladder, in its order, the most accurate (validation) plan
    meeting it among those that may be retrained, each plan once: the candidates a user
    reads off the front at the usual targets (a plan at the last rung is not retrained
    again, so the next most accurate one, off the front, stands in for it). Ranked by
    hypervolume alone, the 40-minute ResNet-20 search of ``benchmarks/beat_recipes.py`` (at
    bae52b2) spent its promotions on the two smallest plans, which still lost 8.8 and 2.8
    points after them."""
    fp32 = fp32_record(records)
    if fp32 is None or not fp32.size_bytes:
        return []
    pool = [r for r in _retrainable(records, settings, has_child) if r.accuracy is not None]
    out: list[TrialRecord] = []
    for kind, factor in LADDER:
        if kind == "size":
            ok = [r for r in pool
                  if (metrics.times_smaller(fp32.size_bytes, r.size_bytes) or 0.0) >= factor]
        else:
            ok = [r for r in pool if (metrics.times_faster(r.latency_vs_fp32) or 0.0) >= factor]
        best = max(ok, key=lambda r: (r.accuracy or 0.0, -(r.size_bytes or 0.0), -r.number),
                   default=None)
        if best is not None and best not in out:
            out.append(best)
    return out


def _concentrated(cost: float, left: float, settings: PromotionSettings) -> tuple[float, int]:
    """The cost and rung of the budget-first retrain: every short fine-tune of ``left`` up
    to the last rung's (factor^2), at least its rung's ``cost``."""
    factor = settings.factor
    cost = max(cost, min(left, float(factor**MAX_RUNGS)))
    return cost, 1 if cost <= factor + 1e-9 else 2


def _stretched(chosen: list[Promotion], left: float,
               settings: PromotionSettings) -> list[Promotion]:
    """``chosen`` with ``left`` short fine-tunes shared among them, none past the last rung
    (what one cannot take goes to the others)."""
    cap = float(settings.factor**MAX_RUNGS)
    costs = [p.cost for p in chosen]
    while left > 1e-9:
        open_ = [i for i, c in enumerate(costs) if c < cap - 1e-9]
        if not open_:
            break
        share = left / len(open_)
        for i in open_:
            add = min(share, cap - costs[i])
            costs[i] += add
            left -= add
    return [
        Promotion(parent=p.parent, steps=round(c * settings.finetune_steps), rung=p.rung, cost=c)
        for p, c in zip(chosen, costs, strict=True)
    ]


__all__ = ["BUDGET_FIRST", "MAX_RUNGS", "Promotion", "fidelity", "plan_promotions"]
