"""A trial's fine-tune on the digits demo: recovery with BatchNorm live, then QAT + KD."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from torch import nn

from autocompress.intake import Task
from autocompress.model.plan import CompressionPlan
from autocompress.train import tuning
from autocompress.transform import quantize
from autocompress.transform.prune import dependency_groups
from autocompress.transform.student import build_student, torch_accuracy

STEPS = 40


def _plan(task: Task, ratio: float, bits: int = 8) -> CompressionPlan:
    x = task.data.example_input(1)
    groups = [g.name for g in dependency_groups(task.model, x) if g.prunable]
    layers = [n for n, m in task.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return CompressionPlan(bits=dict.fromkeys(layers, bits), prune=dict.fromkeys(groups, ratio),
                           activation_bits=8, finetune_steps=STEPS, learning_rate=3e-4)


def _settings(task: Task, plan: CompressionPlan, floor: float) -> tuning.TrialTuning:
    val = list(itertools.islice(task.data.batches("val", 256), 2))
    calibration = [x for x, _ in itertools.islice(task.data.batches("train", 64), 2)]

    def make_qat(student: nn.Module) -> nn.Module:
        qat = quantize.prepare_qat(student, plan)
        quantize.calibrate(qat, calibration)
        return qat

    return tuning.TrialTuning(batch_size=64, device="cpu", seed=0, floor=floor,
                              evaluate=lambda m: torch_accuracy(m, val), make_qat=make_qat)


def _student(task: Task, plan: CompressionPlan) -> nn.Module:
    train = (x for x, _ in task.data.batches("train", 64, shuffle=True, seed=0))
    return build_student(task, plan, 8, bn_batches=train, fold=not tuning.recovers(plan))


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _run(task: Task, plan: CompressionPlan, floor: float = 0.0) -> tuning.TuningResult:
    return tuning.finetune_trial(_student(task, plan), task.model, task.data, plan,
                                 _settings(task, plan, floor))


def test_pruned_plan_recovers_with_batchnorm_live_then_folds(demo_task: Task) -> None:
    plan = _plan(demo_task, 0.5)
    student = _student(demo_task, plan)
    assert _has_bn(student)  # built unfolded: recovery trains through BatchNorm
    result = _run(demo_task, plan)
    assert result.recovery_steps == int(STEPS * tuning.RECOVERY_SHARE)
    assert result.steps == STEPS and result.stopped is None
    # the recovery phase is timed apart (search/retrain_cost.py prices each phase)
    assert 0 < result.recovery_seconds < sum(result.seconds.values())
    assert not _has_bn(result.student)  # folded before QAT: the exported structure
    assert result.qat is not result.student


def test_plan_without_pruning_is_all_qat(demo_task: Task) -> None:
    plan = _plan(demo_task, 0.0)
    assert not tuning.recovers(plan)
    result = _run(demo_task, plan)
    assert result.recovery_steps == 0 and result.steps == STEPS
    assert result.recovery_seconds == 0.0


@pytest.mark.parametrize("steps", [0, tuning.RECOVERY_MIN_STEPS - 1])
def test_short_or_empty_fine_tunes_get_no_recovery(demo_task: Task, steps: int) -> None:
    plan = dataclasses.replace(_plan(demo_task, 0.5), finetune_steps=steps)
    assert tuning.recovery_steps(plan) == 0


def test_early_stop_counts_steps_across_both_phases(demo_task: Task) -> None:
    """A floor no model reaches: the rule acts at the first checkpoint, half-way through the
    whole fine-tune, which falls inside the recovery phase."""
    result = _run(demo_task, _plan(demo_task, 0.5), floor=2.0)
    assert result.steps == STEPS // 2
    assert result.stopped is not None and f"step {STEPS // 2}" in result.stopped
    assert not _has_bn(result.student)  # still a folded structure, as export expects


def test_recovery_beats_training_the_folded_student(demo_task: Task) -> None:
    """The reason for the phase: the same steps, the same rate, pruned 50% at int8; the
    recovered candidate's fake-quant accuracy is higher than QAT on the folded student."""
    plan = _plan(demo_task, 0.5)
    val = list(demo_task.data.batches("val", 256))
    recovered = _run(demo_task, plan)
    old_share = tuning.RECOVERY_SHARE
    try:
        tuning.RECOVERY_SHARE = 0.0
        folded = _run(demo_task, plan)
    finally:
        tuning.RECOVERY_SHARE = old_share
    assert folded.recovery_steps == 0
    a, b = torch_accuracy(recovered.qat, val), torch_accuracy(folded.qat, val)
    assert a > b + 0.01, (a, b)
