"""The guide's techniques as search choices: PTQ candidates, feature distillation,
unstructured sparsity with a zipped-size objective (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from search_fixture import run_short_search

from autocompress import CompressionPlan, SearchConfig, evaluate_plan
from autocompress.intake import Task
from autocompress.study import attrs as trial_attrs
from autocompress.train import distill
from autocompress.transform.student import build_student


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_a_ptq_candidate_has_no_fine_tune(demo_task: Task, method: str) -> None:
    bits = {"conv1": 8, "block1.conv1": 8, "block1.conv2": 8, "down_conv": 8, "fc": 8}
    plan = CompressionPlan(bits=bits, activation_bits=8, realisation="ptq",
                           calibration=method, finetune_steps=150)
    record = evaluate_plan(demo_task, plan,
                           SearchConfig(latency_repeats=3, ptq_methods=(method,)))
    timing = record.json_attr(trial_attrs.TIMING)
    assert "finetune" not in timing and trial_attrs.FINETUNE_STEPS_RUN not in record.attrs
    assert record.plan["realisation"] == "ptq" and record.plan["calibration"] == method
    assert record.attrs[trial_attrs.TORCH_KIND] == "float"
    assert record.measured and (record.accuracy or 0) > 0.8  # int8 PTQ of the demo CNN
    assert record.plan_summary.endswith(f"ptq-{method}")


def test_feature_distillation_changes_the_loss(demo_task: Task) -> None:
    pairs = (("block1", "block1"), ("block2", "block2"))
    plain = CompressionPlan(prune={"block1.conv1": 0.5}, finetune_steps=6)
    with_features = CompressionPlan(prune={"block1.conv1": 0.5}, finetune_steps=6,
                                    feature_pairs=pairs, feature_weight=1.0)
    losses = []
    for plan in (plain, with_features):
        student = build_student(demo_task, plan, 8)
        result = distill.finetune(student, demo_task.model, demo_task.data, plan,
                                  batch_size=32, seed=0)
        losses.append(result.final_loss)
    assert losses[0] != pytest.approx(losses[1])


def test_search_with_the_guide_techniques_records_them(tmp_path: Path) -> None:
    """A short search with sparsity (global), feature KD and PTQ available: each trial's plan
    records its choices, the size objective is the zipped file, PTQ trials skip the
    fine-tune, and sparse plans' zeros show in the zipped size."""
    short = run_short_search(
        tmp_path, study="guide", trials=5, guided=False, finetune_steps=20, budgets=(),
        sparsity_max=0.6, sparsity_step=0.2, sparsity_scope="global", size_metric="zip",
        feature_weight_max=1.0, ptq_methods=("minmax",), sampler="random",
    )
    study = optuna.load_study(study_name="guide", storage=short.storage_url)
    assert study.metric_names == ["accuracy", "zip_size_bytes"]
    searched = [t for t in study.trials if t.state.name == "COMPLETE"
                and trial_attrs.BASELINE not in t.user_attrs]
    assert searched
    for t in searched:
        plan = json.loads(t.user_attrs[trial_attrs.PLAN])
        assert {"sparsity/global", "kd/features", "realise"} <= set(t.params)
        assert plan["global_sparsity"] == pytest.approx(t.params["sparsity/global"])
        assert (plan["feature_weight"] > 0) == (t.params["kd/features"] == "on")
        assert plan["realisation"] == ("ptq" if t.params["realise"] == "ptq-minmax" else "qat")
        assert t.values[1] == t.user_attrs[trial_attrs.ZIP_SIZE]  # the objective: zipped
        assert t.user_attrs[trial_attrs.SIZE_METRIC] == "zip"
        timing = json.loads(t.user_attrs[trial_attrs.TIMING])
        assert ("finetune" in timing) == (plan["realisation"] == "qat")


def test_dynamic_int8_baseline_only_for_linear_heavy_models(demo_task: Task) -> None:
    """ConvInteger runs 6-7x slower than fp32 here: a convolutional model does not pay for
    scoring a dynamic baseline; an MLP (the guide's case for dynamic quantization) gets it."""
    import torch
    from torch import nn

    from autocompress.config.settings import SearchSettings
    from autocompress.search.loop import _enqueue_baselines, linear_share
    from autocompress.transform.survey import build_inventory

    conv = build_inventory(demo_task.model, demo_task.data.example_input(1))
    mlp_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    mlp = build_inventory(mlp_model, torch.zeros(1, 1, 8, 8))
    assert linear_share(conv) < 0.1 and linear_share(mlp) == 1.0
    for inventory, expected in ((conv, {"fp32", "int8-ptq"}),
                                (mlp, {"fp32", "int8-ptq", "int8-dynamic"})):
        study = optuna.create_study(directions=["maximize", "minimize"])
        settings = SearchSettings.from_config(SearchConfig())
        assert _enqueue_baselines(study, inventory, settings.space, settings.run) == len(
            expected)
        names = {t.user_attrs[trial_attrs.BASELINE] for t in study.get_trials()}
        assert names == expected
