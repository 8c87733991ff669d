"""Which plans are promoted to longer fine-tunes, and how the front counts them."""

from __future__ import annotations

import dataclasses

import pytest

from autocompress.config.options import SearchConfig
from autocompress.config.settings import PromotionSettings, SearchSettings
from autocompress.results.pareto import most_trained, pareto_front, select_best
from autocompress.search.promotion import plan_promotions
from autocompress.study.records import TrialRecord

CONFIG = SearchConfig(finetune_steps=100, promote_factor=4, promote_share=0.25)


def _promo(config: SearchConfig) -> PromotionSettings:
    return SearchSettings.from_config(config).promotion


def _rec(number: int, acc: float, size: float, *, steps: int = 100, parent: int | None = None,
         baseline: str | None = None, feasible: bool = True) -> TrialRecord:
    attrs: dict[str, object] = {}
    if parent is not None:
        attrs["parent_trial"] = parent
    return TrialRecord(number=number, state="COMPLETE", accuracy=acc, size_bytes=size,
                       latency_ms=1.0, feasible=feasible, baseline=baseline,
                       plan={"finetune_steps": steps}, attrs=attrs)


def test_a_feasible_retrain_replaces_its_parent_on_the_front() -> None:
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.80, 100),
            _rec(2, 0.85, 100, steps=400, parent=1)]
    assert [r.number for r in most_trained(recs)] == [0, 2]
    assert [r.number for r in pareto_front(recs)] == [2, 0]
    chosen = select_best(recs, [])
    assert chosen is not None and 1 not in [chosen.chosen.number,
                                            *(r.number for r in chosen.runners_up)]


def test_a_retrain_over_budget_leaves_its_parent() -> None:
    recs = [_rec(1, 0.80, 100), _rec(2, 0.85, 100, steps=400, parent=1, feasible=False)]
    assert [r.number for r in pareto_front(recs)] == [1]


def test_promotions_follow_hypervolume_and_the_effort() -> None:
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.80, 100), _rec(2, 0.86, 300),
            _rec(3, 0.70, 90), _rec(4, 0.60, 500)]  # 4 is dominated
    got = plan_promotions(recs, _promo(CONFIG), effort=8, reference_size=1100)
    assert len(got) == 2  # each costs 4 short fine-tunes
    assert all(p.steps == 400 and p.rung == 1 for p in got)
    assert {p.parent for p in got} <= {1, 2, 3}  # never the baseline or a dominated plan
    assert plan_promotions(recs, _promo(CONFIG), effort=3, reference_size=1100) == []
    assert plan_promotions(recs, _promo(CONFIG.replace(promote_share=0.0)), effort=8,
                           reference_size=1100) == []


def test_the_most_accurate_plan_at_a_ladder_target_goes_before_hypervolume() -> None:
    """The 50x plan adds the most hypervolume; the most accurate plan at least 8x smaller
    (the guided ladder's first target) is promoted first all the same; then the most
    accurate plan at 1.5x faster, then at 16x smaller (the 4x target's best is the 8x plan:
    counted once)."""
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.89, 120), _rec(2, 0.885, 200),
            _rec(3, 0.60, 20)]
    assert [p.parent for p in plan_promotions(recs, _promo(CONFIG), effort=4,
                                               reference_size=1100)] == [1]
    fast = [dataclasses.replace(r, latency_vs_fp32=ratio) for r, ratio in
            zip([*recs, _rec(4, 0.88, 600)], [1.0, 0.9, 0.9, 0.5, 0.6], strict=True)]
    got = plan_promotions(fast, _promo(CONFIG), effort=12, reference_size=1100)
    assert [p.parent for p in got] == [1, 4, 3]


def test_second_rung_and_no_double_promotion() -> None:
    recs = [_rec(1, 0.80, 100), _rec(2, 0.85, 100, steps=400, parent=1)]
    got = plan_promotions(recs, _promo(CONFIG), effort=100, reference_size=1100)
    assert [(p.parent, p.steps, p.rung) for p in got] == [(2, 1600, 2)]
    recs.append(_rec(3, 0.86, 100, steps=1600, parent=2))
    assert plan_promotions(recs, _promo(CONFIG), effort=100, reference_size=1100) == []  # last rung


def test_under_a_budget_the_most_accurate_plan_is_retrained_first() -> None:
    """The small plan adds the most hypervolume, but under a budget the plan `export --best`
    delivers is the most accurate one within it: that one goes first."""
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.80, 100), _rec(2, 0.815, 300),
            _rec(3, 0.70, 90)]
    plain = plan_promotions(recs, _promo(CONFIG), effort=4, reference_size=1100)
    budgeted = plan_promotions(recs, _promo(CONFIG.replace(budgets=("1ms",))), effort=4,
                               reference_size=1100)
    assert [p.parent for p in plain] != [2]
    assert [p.parent for p in budgeted] == [2]


def test_under_a_budget_the_most_accurate_takes_the_effort_up_to_the_last_rung() -> None:
    """One long retrain of the plan `export --best` delivers, not two at half the steps: the
    runner-up (3) gets only what the first leaves over, after the last rung (16 x)."""
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.80, 100), _rec(2, 0.815, 300),
            _rec(3, 0.812, 250), _rec(4, 0.70, 90)]
    budgeted = plan_promotions(recs, _promo(CONFIG.replace(budgets=("1ms",))), effort=8,
                               reference_size=1100)
    assert [(p.parent, p.steps, p.rung) for p in budgeted] == [(2, 800, 2)]
    more = plan_promotions(recs, _promo(CONFIG.replace(budgets=("1ms",))), effort=21,
                           reference_size=1100)
    assert [(p.parent, p.steps) for p in more][:1] == [(2, 1600)]
    assert sum(p.cost for p in more) <= 21
    assert all(p.parent != 2 for p in more[1:])
    assert plan_promotions(recs, _promo(CONFIG.replace(budgets=("1ms",))), effort=3,
                           reference_size=1100) == []  # less than one rung: none


def test_under_a_budget_the_first_need_not_be_on_the_size_front() -> None:
    """The most accurate plan within the budget (2) is dominated by the int8 baseline, so off
    the front; it still goes first, before the front's small, far less accurate plan (4),
    and never an infeasible one (5)."""
    recs = [_rec(0, 0.90, 1000, baseline="fp32", feasible=False),
            _rec(1, 0.905, 300, baseline="int8"), _rec(2, 0.8226, 350),
            _rec(4, 0.7792, 56), _rec(5, 0.87, 200, feasible=False)]
    assert [r.number for r in pareto_front(recs) if r.baseline is None] == [4]
    budgeted = plan_promotions(recs, _promo(CONFIG.replace(budgets=("1ms",))), effort=8,
                               reference_size=1100)
    assert [p.parent for p in budgeted] == [2]


def test_the_default_share_is_larger_under_budgets() -> None:
    assert SearchConfig().promotion_share() == 0.25
    assert SearchConfig(budgets=("1ms",)).promotion_share() == 0.5
    assert SearchConfig(budgets=("1ms",), promote_share=0.1).promotion_share() == 0.1


def test_under_a_time_limit_the_leftover_lengthens_the_chosen_retrains() -> None:
    """11 short fine-tunes of time: two rung-1 promotions (4 each) leave 3, too little for a
    third; stretched, the two share them (550 steps each) instead of the time going to short
    trials that are never retrained."""
    recs = [_rec(0, 0.90, 1000, baseline="fp32"), _rec(1, 0.80, 100), _rec(2, 0.815, 300),
            _rec(3, 0.70, 90)]
    plain = plan_promotions(recs, _promo(CONFIG), effort=11, reference_size=1100)
    stretched = plan_promotions(recs, _promo(CONFIG), effort=11, reference_size=1100, stretch=True)
    assert [p.steps for p in plain] == [400, 400]
    assert [p.steps for p in stretched] == [550, 550]
    assert sum(p.cost for p in stretched) == 11
    # never past the last rung (factor^2 = 16 short fine-tunes): the rest stays unspent
    capped = plan_promotions(recs[:2], _promo(CONFIG), effort=40, reference_size=1100, stretch=True)
    assert [(p.parent, p.steps, p.rung) for p in capped] == [(1, 1600, 1)]


def test_a_retrain_past_the_first_rung_is_capped_at_the_last() -> None:
    """A plan retrained to 9.4 x (a concentrated budget-first retrain) is promoted again only
    to the last rung (16 x), never 4 x its own steps."""
    recs = [_rec(1, 0.80, 100), _rec(2, 0.85, 100, steps=940, parent=1)]
    got = plan_promotions(recs, _promo(CONFIG), effort=100, reference_size=1100)
    assert [(p.parent, p.steps) for p in got] == [(2, 1600)]


def test_under_a_time_limit_the_effort_counts_a_retrains_fixed_part_once() -> None:
    """Time left over the short fine-tune's own seconds, after one trial's build, export and
    measurement: 290 s of a 600 s limit over 40 s fine-tunes is 7.25 short fine-tunes (not
    300 s over the 50 s of a whole short trial, 6). The search costs the first retrain at its
    own plan's speed this way (``search.promote.promote``)."""
    import time

    from autocompress.search.counter import TrialCounter

    config = SearchConfig(time_limit=10.0, budgets=("1ms",))
    settings = SearchSettings.from_config(config)
    counter = TrialCounter(settings.run, settings.promotion, baselines=2,
                           started=time.perf_counter() - 300.0)
    timing = {"build": 1.0, "precheck": 0.5, "finetune": 40.0, "export": 0.5, "measure": 8.0}
    steps = config.finetune_steps
    effort = counter.promotion_effort([(timing, steps), (timing, steps),
                                       ({"build": 1.0, "measure": 9.0}, None)])
    assert effort == pytest.approx(7.25, abs=0.01)
    # a retrained plan's timing counts per short fine-tune: 160 s over 4x the steps
    long = {**timing, "finetune": 160.0}
    assert counter.promotion_effort([(long, 4 * steps)]) == pytest.approx(7.25, abs=0.01)
    assert counter.promotion_effort([({"build": 1.0, "measure": 9.0}, None)]) == 0.0
