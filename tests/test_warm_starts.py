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


def test_under_a_latency_budget_no_quantized_width_fits_so_pruning_alone_at_float_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ResNet-20 under 0.6x of fp32: no uniform ratio met it at int8 or int4 weight-only (their
    per-operator cost), so no pruned warm start opened the search; pruning alone at float
    reached 0.51x. The float fallback is tried only when no quantized one fits."""
    timing = {8: 0.9, 4: 1.2, 32: 0.6}  # ms at any ratio above 0; 1.5 ms unpruned
    monkeypatch.setattr(
        warm_starts.space, "uniform_plan",
        lambda _inv, _settings, *, bits, ratio=0.0, activation_bits: (bits, ratio))
    monkeypatch.setattr(warm_starts.space, "prune_high", lambda _settings: 0.5)
    monkeypatch.setattr(warm_starts.space, "activations_for", lambda bits, _s: bits)
    monkeypatch.setattr(warm_starts.space, "plan_to_params", lambda plan, *_a: {"plan": plan})
    monkeypatch.setattr(warm_starts, "build_student", lambda *_a: None)
    runner = _FakeRunner({}, "0.7ms")
    runner.precheck = lambda _s, plan, *_a: SimpleNamespace(  # type: ignore[method-assign]
        estimate_ms=1.5 if plan[1] == 0 else timing[plan[0]], size_bytes=1e3)
    settings = SimpleNamespace(prune_step=0.1, bits=(32, 8, 4))
    named, notes = warm_starts._pruned_warm_starts(
        runner, None, settings, runner.ctx.budgets, [], (8, 4))  # type: ignore[arg-type]
    assert named == [("budget-fp32", {"plan": (32, 0.1)})]
    assert any("at float" in n for n in notes)
    timing[8] = 0.5  # int8 fits now: no float fallback
    named, _ = warm_starts._pruned_warm_starts(
        runner, None, settings, runner.ctx.budgets, [], (8, 4))  # type: ignore[arg-type]
    assert [n for n, _ in named] == ["budget-int8"]
    size_only = [parse_budget("100KB")]  # a size budget: float pruning is not tried
    runner.ctx.budgets = size_only
    timing[8] = 0.9
    named, _ = warm_starts._pruned_warm_starts(
        runner, None, settings, size_only, [], (8, 4))  # type: ignore[arg-type]
    assert all(n != "budget-fp32" for n, _ in named)
