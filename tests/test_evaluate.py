"""evaluate_plan: one plan measured end to end like a search trial, outside any study."""

from __future__ import annotations

import pytest

from autocompress import CompressionPlan, SearchConfig, evaluate_plan
from autocompress.errors import PlanError
from autocompress.intake import Task


def test_one_plan_end_to_end(demo_task: Task) -> None:
    plan = CompressionPlan(bits={"conv1": 8, "block1.conv1": 4, "fc": 8},
                           prune={"block2.conv1": 0.25}, finetune_steps=20)
    record = evaluate_plan(demo_task, plan, SearchConfig(latency_repeats=3))
    assert record.measured and record.state == "COMPLETE"
    assert record.plan["bits"]["block1.conv1"] == 4
    assert record.plan["prune"]["block2.conv1"] == 0.25
    assert record.plan["finetune_steps"] == 20
    assert record.attrs["finetune_steps_run"] == 20  # no early stop, no rounding
    assert record.attrs["recovery_steps"] == 15  # it prunes: 3/4 of the steps with BN live
    assert 0.5 < (record.accuracy or 0) <= 1.0 and record.size_bytes and record.latency_vs_fp32
    assert set(record.json_attr("weight_types")) >= {"conv1", "block1.conv1"}


def test_a_plan_the_space_cannot_express_is_refused(demo_task: Task) -> None:
    plan = CompressionPlan(bits={"conv1": 8}, sparsity={"conv1": 0.5}, finetune_steps=5)
    with pytest.raises(PlanError, match="sparsity"):
        evaluate_plan(demo_task, plan, SearchConfig(latency_repeats=3))
