"""Pruned warm starts under a budget (search/warm_starts.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from autocompress.config.budgets import parse_budget
from autocompress.search import warm_starts


class _FakeRunner:
    """A runner whose pre-check times a uniform plan at ``ms(ratio)``: no model needed."""

    def __init__(self, ms: dict[float, float], budget: str) -> None:
        self.ms = ms
        self.checked: list[float] = []
        self.ctx = SimpleNamespace(task=None, training=SimpleNamespace(round_to=1),
                                   workdir=Path("/nonexistent"), budgets=[parse_budget(budget)])

    def precheck(self, student: Any, plan: Any, _parent: Any, _folder: Path) -> Any:
        self.checked.append(plan)
        return SimpleNamespace(estimate_ms=self.ms[plan], size_bytes=1e3)


@pytest.fixture
def uniform_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uniform plan is its ratio, a student nothing: the bisection sees only timings."""
    monkeypatch.setattr(warm_starts.space, "uniform_plan",
                        lambda _inv, _settings, *, bits, ratio=0.0, activation_bits: ratio)
    monkeypatch.setattr(warm_starts.space, "prune_high", lambda _settings: 0.5)
    monkeypatch.setattr(warm_starts, "build_student", lambda *_a: None)


SETTINGS = SimpleNamespace(prune_step=0.1)
# The pre-check at ratio 0 fits 1 ms (0.90 / 0.95 margin), but the baseline measured over it.
TIMES = {0.0: 0.90, 0.1: 0.85, 0.2: 0.80, 0.3: 0.70, 0.4: 0.60, 0.5: 0.50}


def test_the_least_pruning_within_the_budget_is_found_by_bisection(uniform_plans: None) -> None:
    runner = _FakeRunner(TIMES, "0.8ms")  # 0.8 * 0.95 = 0.76: 0.3 is the least that fits
    ratio = warm_starts._smallest_ratio_within(runner, None, SETTINGS, 8, 8)  # type: ignore[arg-type]
    assert ratio == 0.3


def test_a_measured_unpruned_baseline_over_the_budget_starts_the_grid_one_step_up(
    uniform_plans: None,
) -> None:
    """Budget seed 1: the int8 PTQ baseline measured 0.424 ms against a 0.414 ms budget while
    its pre-check fit, so ratio 0 came back and no int8 warm start was queued at all (only an
    int4 weight-only one, 17 points down). The least pruning above 0 is the warm start."""
    runner = _FakeRunner(TIMES, "1ms")
    assert warm_starts._smallest_ratio_within(runner, None, SETTINGS, 8, 8) == 0.0  # type: ignore[arg-type]
    runner = _FakeRunner(TIMES, "1ms")
    ratio = warm_starts._smallest_ratio_within(runner, None, SETTINGS, 8, 8,  # type: ignore[arg-type]
                                               skip_unpruned=True)
    assert ratio == pytest.approx(0.1)
    assert 0.0 not in runner.checked
