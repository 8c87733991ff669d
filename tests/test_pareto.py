"""Front, hypervolume and the selection rule on hand-made records."""

from __future__ import annotations

import pytest

from autocompress.config.budgets import parse_budget
from autocompress.results.pareto import (
    closest_to_budgets,
    hypervolume_2d,
    pareto_front,
    select_best,
)
from autocompress.study.records import TrialRecord


def rec(n: int, acc: float, size: float, lat: float = 1.0, **kw) -> TrialRecord:
    return TrialRecord(number=n, state="COMPLETE", accuracy=acc, size_bytes=size,
                       latency_ms=lat, feasible=kw.pop("feasible", True), **kw)


def test_front_drops_dominated_infeasible_and_rejected() -> None:
    records = [
        rec(0, 0.98, 400),
        rec(1, 0.97, 100),
        rec(2, 0.96, 150),  # dominated by 1
        rec(3, 0.99, 50, feasible=False),
        rec(4, 0.99, 40, rejected="over budget"),
        TrialRecord(number=5, state="FAIL"),
    ]
    assert [r.number for r in pareto_front(records)] == [1, 0]


def test_hypervolume_staircase() -> None:
    # Points (size, acc): (100, .5) and (200, .8); reference size 400, accuracy 0.
    # Area = (200-100)*.5 + (400-200)*.8 = 50 + 160 = 210 -> /400.
    hv = hypervolume_2d([rec(0, 0.5, 100), rec(1, 0.8, 200)], reference_size=400)
    assert hv == pytest.approx(210 / 400)
    assert hypervolume_2d([rec(0, 0.5, 100)], 400) < hv


def test_select_best_within_budgets_ties_to_smaller() -> None:
    records = [rec(0, 0.95, 300, 1.0), rec(1, 0.95, 200, 1.5), rec(2, 0.99, 900, 9.0)]
    chosen = select_best(records, [parse_budget("2ms")])
    assert chosen is not None and chosen.chosen.number == 1
    assert [r.number for r in chosen.runners_up] == [0]
    assert "2ms" in chosen.rule


def test_select_best_respects_accuracy_drop() -> None:
    records = [rec(0, 0.90, 100), rec(1, 0.99, 400)]
    chosen = select_best(records, [], max_accuracy_drop=0.01, reference_accuracy=0.995)
    assert chosen is not None and chosen.chosen.number == 1
    assert select_best(records, [], max_accuracy_drop=0.001, reference_accuracy=1.0) is None


def test_closest_to_budgets_says_what_each_misses_by() -> None:
    records = [rec(0, 0.9, 100, 3.0), rec(1, 0.9, 100, 2.2), rec(2, 0.9, 100, 10.0)]
    closest = closest_to_budgets(records, [parse_budget("2ms")], k=2)
    assert [r.number for r, _ in closest] == [1, 0]
    assert "+10%" in closest[0][1]


def test_an_accuracy_drop_limit_on_a_negated_metric_allows_that_share_of_its_size() -> None:
    """neg_mae (lower-is-better, recorded negated): fp32 at -0.5 and a 1% limit admit down to
    -0.505. The floor was -0.5 x 0.99 = -0.495, above fp32, so nothing within 1% qualified."""
    records = [rec(1, -0.503, 100), rec(2, -0.52, 50)]
    chosen = select_best(records, [], max_accuracy_drop=0.01, reference_accuracy=-0.5,
                         metric="neg_mae")
    assert chosen is not None and chosen.chosen.number == 1
    assert "at most 1.00% neg_mae drop vs fp32" in chosen.rule
    assert select_best([rec(2, -0.52, 50)], [], max_accuracy_drop=0.01,
                       reference_accuracy=-0.5) is None
