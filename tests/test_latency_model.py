"""The feasible-first latency model: features of built structures, the fit, and when it may
reject a plan without a pre-check."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from autocompress.config.options import SearchConfig
from autocompress.model import space
from autocompress.runtime.latency_model import (
    AUDIT_EVERY,
    LatencyModel,
    LayerCost,
    cost_features,
    structure_features,
)
from autocompress.transform.student import build_student
from autocompress.transform.survey import build_inventory


def test_features_count_the_macs_left_at_each_width(demo_task: Any) -> None:
    teacher = copy.deepcopy(demo_task.model)
    inventory = build_inventory(teacher, demo_task.data.example_input(1))
    config = SearchConfig()
    full8 = space.uniform_plan(inventory, config, bits=8)
    feats = structure_features(build_student(demo_task, full8, 8), full8, inventory, teacher)
    assert feats[0] == 1.0 and feats[1] + feats[2] == pytest.approx(1.0)  # every MAC counted
    assert feats[2] > 0.3 and feats[3] == 0.0  # the searchable layers at int8
    pruned = space.uniform_plan(inventory, config, bits=4, ratio=0.5)
    small = structure_features(build_student(demo_task, pruned, 8), pruned, inventory, teacher)
    assert small[2] == 0.0 and 0.0 < small[3] < feats[2] * 0.8  # pruning removed MACs
    # output elements shrink with the output channels (linearly), MACs with both sides
    assert feats[4] > 0 and 0.0 < small[5] < feats[4] and small[3] < small[5]


def test_features_count_outputs_and_float_integer_switches() -> None:
    layers = [LayerCost(10.0, 4.0, 8), LayerCost(20.0, 4.0, 32), LayerCost(10.0, 2.0, 4),
              LayerCost(10.0, 2.0, 4)]
    feats = cost_features(layers, total_macs=100.0, total_outputs=20.0)
    assert feats == pytest.approx([1.0, 0.2, 0.1, 0.2, 0.2, 0.2, 2 / 4])
    # weight-only (or any unknown width) layers count as float and never switch
    assert cost_features([LayerCost(1.0, 1.0, 32), LayerCost(1.0, 1.0, 16)], 2.0, 2.0)[-1] == 0


def _synthetic(model: LatencyModel, n: int) -> None:
    for i in range(n):
        f32, f8, f4 = (i % 3) / 3, ((i + 1) % 4) / 4, (i % 5) / 5
        model.observe(f"s{i}", [1.0, f32, f8, f4], 0.1 + 0.9 * f32 + 0.6 * f8 + 1.2 * f4)


def test_fit_predicts_a_linear_latency_and_waits_for_data() -> None:
    model = LatencyModel()
    _synthetic(model, 3)
    assert model.predict([1.0, 0.5, 0.5, 0.0]) is None  # too few structures yet
    _synthetic(model, 12)
    assert model.predict([1.0, 0.5, 0.5, 0.0]) == pytest.approx(0.1 + 0.45 + 0.3, abs=0.01)


def test_only_a_checked_model_rejects_and_every_few_are_audited() -> None:
    model = LatencyModel()
    _synthetic(model, 12)
    assert not model.should_skip(3.0, 0.6)  # no prediction checked against a pre-check yet
    for _ in range(3):
        model.record_check(1.0, 1.02)
    assert model.trusted()
    assert not model.should_skip(0.7, 0.6)  # over, but not far over: pre-check it
    skips = [model.should_skip(3.0, 0.6) for _ in range(2 * AUDIT_EVERY)]
    assert skips.count(False) == 2  # every AUDIT_EVERY-th far-over plan is measured anyway
    model.record_check(1.0, 2.0)
    model.record_check(1.0, 2.0)
    model.record_check(1.0, 2.0)
    assert not model.trusted() and not model.should_skip(3.0, 0.6)  # wrong too often
    summary = model.summary(0.6)
    assert summary["checked"] == 6 and summary["verdicts_right"] == 6
