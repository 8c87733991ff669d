"""Multi-fidelity: the plans that earned it are fine-tuned again, longer, as linked trials.

Successive halving in spirit (Hyperband, ASHA): every candidate gets the short fine-tune;
when a run's search trials are done, the front's members that add the most hypervolume
are retrained with ``promote_factor`` x their steps (a second rung, factor squared, for
plans already promoted once), each as a new trial with the same plan, its own file and
measurements and the user attribute ``parent_trial``. The front, ``show``, the dashboard
and ``export --best`` then count each plan once, at its most-trained trial
(``pareto.most_trained``).

The effort is a share of the run's (``SearchConfig.promotion_share``: 0.25, 0.5 under
budgets), in units of one short fine-tune: ``share x trials`` without a time limit; with
``--time-limit``, the search part stops at ``1 - share`` of it and promotions use what is
left, costed by the run's own mean time per short trial, planned again after each batch
while the time lasts (a retrained plan may earn the next rung); what is too little for one
more promotion lengthens the chosen ones (``stretch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autocompress.config import SearchConfig
from autocompress.pareto import (
    TrialRecord,
    hypervolume_contributions,
    most_trained,
    parent_of,
    pareto_front,
)

MAX_RUNGS = 2  # x factor, then x factor^2; longer repairs are `autocompress refine`'s job
BUDGET_FIRST = 2  # under budgets, this many of the most accurate plans are retrained first


@dataclass(frozen=True)
class Promotion:
    parent: int
    steps: int  # fine-tune steps of the retrain
    rung: int  # 1: factor x the search's steps, 2: factor^2 x
    cost: float  # in short fine-tunes (the search's finetune_steps)


def fidelity(record: TrialRecord, config: SearchConfig) -> float:
    """The record's fine-tune steps over the search's (1 for an ordinary trial)."""
    steps = record.plan.get("finetune_steps")
    if not steps or not config.finetune_steps:
        return 1.0
    return float(steps) / config.finetune_steps


def plan_promotions(
    records: Sequence[TrialRecord],
    config: SearchConfig,
    *,
    effort: float,
    reference_size: float,
    stretch: bool = False,
) -> list[Promotion]:
    """Which front members to retrain within ``effort`` short fine-tunes, most hypervolume
    first (under budgets, the most accurate plans within them before them, on the front or
    not). Baselines (nothing fine-tuned), plans already retrained (or being retrained) and
    plans at the last rung are left out.

    ``stretch`` (under a time limit): the effort is time that is lost when not spent, so
    what the rungs leave over (less than one more promotion) lengthens the chosen retrains,
    shared equally, up to the last rung's steps each. Short trials run in that leftover
    instead would never be retrained, and the deliverable is a retrained plan."""
    if config.promotion_share() <= 0 or config.finetune_steps == 0 or effort <= 0:
        return []
    factor = config.promote_factor
    has_child = {parent_of(r) for r in records if parent_of(r) is not None}
    front = pareto_front(records)
    gains = hypervolume_contributions(records, reference_size)
    ranked = sorted(
        (r for r in front if r.baseline is None and r.number not in has_child),
        key=lambda r: (-gains.get(r.number, 0.0), r.number),
    )
    if config.budgets:
        # Under budgets the most accurate plan within them is what `export --best` delivers,
        # the candidate the user came for: the BUDGET_FIRST most accurate are retrained
        # first (the order after a short fine-tune is a noisy guess of the order after a long
        # one), then the rest by hypervolume. They are drawn from every plan measured within
        # the budgets, not only the size front: a plan a smaller one beats by a hair after
        # 150 steps is as likely to be the most accurate after 600 (the benchmark's second
        # promotion went to the front's smallest plan, 4 points behind, instead).
        within = [r for r in most_trained(records)
                  if r.measured and r.feasible and r.baseline is None
                  and r.number not in has_child and fidelity(r, config) < factor**MAX_RUNGS]
        top = sorted(within, key=lambda r: (-(r.accuracy or 0.0), r.number))[:BUDGET_FIRST]
        ranked = top + [r for r in ranked if r not in top]
    out: list[Promotion] = []
    left = effort
    for record in ranked:
        level = fidelity(record, config)
        rung = 1 if level < factor else 2
        if level >= factor**MAX_RUNGS:
            continue
        cost = level * factor
        if cost > left + 1e-9:
            continue
        steps = round(level * factor * config.finetune_steps)
        out.append(Promotion(parent=record.number, steps=steps, rung=rung, cost=cost))
        left -= cost
    if stretch:
        out = _stretched(out, left, config)
    return out


def _stretched(chosen: list[Promotion], left: float, config: SearchConfig) -> list[Promotion]:
    """``chosen`` with ``left`` short fine-tunes shared among them, none past the last rung
    (what one cannot take goes to the others)."""
    cap = float(config.promote_factor**MAX_RUNGS)
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
        Promotion(parent=p.parent, steps=round(c * config.finetune_steps), rung=p.rung, cost=c)
        for p, c in zip(chosen, costs, strict=True)
    ]


__all__ = ["BUDGET_FIRST", "MAX_RUNGS", "Promotion", "fidelity", "plan_promotions"]
