"""A trial's fine-tune: recovery with BatchNorm live (plans that prune), then QAT + KD, both
under one early-stop rule.

Why two phases. A plan's student is BatchNorm-folded before QAT (fake-quant must see the
weights the exported file will hold), and a folded network is hard to repair: nothing
re-normalises the activations a pruned layer now produces. Measured on ResNet-20 / CIFAR-10
(the shared teacher, every group pruned 30%, float, AdamW + KD, validation top-1 on 2,000
images, teacher 0.9015, 0.5465 right after pruning and BN re-estimation):

    steps  learning rate   BN folded   BN live
    150    3e-4            0.7940      0.7980
    150    1e-3            0.8080      0.8285
    150    3e-3            0.4300      0.8200
    600    1e-3                        0.8545

and through the whole trial (``evaluate_plan``, 150 steps at the study's 3e-4, exported file,
5,000 validation images), by the share of steps spent in recovery:

    plan                       share 0   share 0.5   share 0.75
    float, every group -30%    0.7944    0.8256      0.8302
    int8, every group -20%     0.8544    0.8670      0.8682

So a plan that prunes spends ``RECOVERY_SHARE`` of its steps on the unfolded student at a
higher rate (BatchNorm keeps a higher rate stable; the study's rate is chosen by a probe on an
unpruned int8 student, which a high rate harms), then folds BatchNorm and runs its QAT + KD
steps at the study's rate. Plans that do not prune, models without BatchNorm and PTQ plans
fine-tune as before. The early-stop rule (``is_hopeless``) counts steps across both phases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from autocompress.model.plan import CompressionPlan
from autocompress.train import distill
from autocompress.train.teacher_cache import TeacherCache
from autocompress.transform import quantize

RECOVERY_SHARE = 0.75  # of a pruning plan's fine-tune steps, spent with BatchNorm live
RECOVERY_LR_FACTOR = 3.0  # x the study's learning rate during recovery...
RECOVERY_LR_CAP = 3e-3  # ...but no higher than this (the table above)
RECOVERY_MIN_STEPS = 20  # a shorter fine-tune is all QAT


@dataclass(frozen=True)
class TrialTuning:
    """What one trial's fine-tune needs besides the models (plain values and callbacks)."""

    batch_size: int
    device: str
    seed: int
    floor: float  # the early-stop floor: fp32 accuracy minus early_stop_drop
    evaluate: Callable[[nn.Module], float]
    make_qat: Callable[[nn.Module], nn.Module]  # fake-quant model with calibrated observers
    early_stop: bool = True
    progress: Callable[[int, int], None] | None = None
    loss: Callable[..., object] | None = None
    # the study's shared batch stream and teacher outputs (``teacher_cache``), read from
    # position ``start``: an inherited fine-tune continues where its lineage stopped
    teacher_cache: TeacherCache | None = None
    start: int = 0


@dataclass(frozen=True)
class TuningResult:
    student: nn.Module  # the folded float structure the QAT model started from
    qat: nn.Module
    steps: int  # steps run, both phases
    recovery_steps: int
    stopped: str | None  # the early-stop reason, None when it ran to the end
    seconds: dict[str, float] = field(default_factory=dict)  # both phases, by kind of work
    # the recovery phase's share of ``seconds``: a step there and a QAT step differ in cost
    # (int8 QAT 3x a BatchNorm-live step on ResNet-20, weight-only QAT 0.8x), so a retrain
    # with another mix of the two is costed phase by phase (search/retrain_cost.py)
    recovery_seconds: float = 0.0


def recovers(plan: CompressionPlan) -> bool:
    """Whether the plan gets a recovery phase (its student must then be built unfolded)."""
    return recovery_steps(plan) > 0


def recovery_steps(plan: CompressionPlan) -> int:
    if plan.is_ptq or plan.finetune_steps < RECOVERY_MIN_STEPS:
        return 0
    if not any(r > 0 for r in plan.prune.values()):
        return 0
    return int(plan.finetune_steps * RECOVERY_SHARE)


def recovery_learning_rate(plan: CompressionPlan) -> float:
    return max(plan.learning_rate, min(RECOVERY_LR_CAP, plan.learning_rate * RECOVERY_LR_FACTOR))


def finetune_trial(
    student: nn.Module, teacher: nn.Module, data: distill._Batches, plan: CompressionPlan,
    tuning: TrialTuning,
) -> TuningResult:
    """Recovery (when ``recovers(plan)``; ``student`` then still holds its BatchNorm), BN
    folding, then QAT + KD for the rest of ``plan.finetune_steps``."""
    total = plan.finetune_steps
    checkpoints = early_stop_checkpoints(total)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    first = recovery_steps(plan) if has_bn else 0

    def run(model: nn.Module, phase: CompressionPlan, offset: int) -> distill.FinetuneResult:
        return distill.finetune(
            model, teacher, data, phase,
            batch_size=tuning.batch_size, device=tuning.device,
            evaluate=tuning.evaluate if tuning.early_stop else None,
            eval_every=1,
            # Only where the rule can act: an evaluation costs forward passes over val data.
            evaluate_at=lambda step: step + offset in checkpoints,
            should_stop=(lambda step, metric: is_hopeless(step + offset, metric, total=total,
                                                          floor=tuning.floor))
            if tuning.early_stop else None,
            seed=tuning.seed + offset,
            progress=None if tuning.progress is None
            else (lambda step, _: tuning.progress(step + offset, total)),  # type: ignore[misc]
            loss=tuning.loss,  # type: ignore[arg-type]
            teacher_cache=tuning.teacher_cache, start=tuning.start + offset,
        )

    if first:
        recovery = dataclasses.replace(plan, finetune_steps=first,
                                       learning_rate=recovery_learning_rate(plan))
        result = run(student, recovery, 0)
        seconds = dict(result.seconds)
        recovery_seconds = round(sum(seconds.values()), 4)
        student.eval()
        if result.stopped_early:
            folded = quantize.fold_batchnorm(student)
            return TuningResult(folded, tuning.make_qat(folded), result.steps, result.steps,
                                f"early-stopped at step {result.steps}: {result.reason}",
                                seconds, recovery_seconds)
    else:
        seconds, recovery_seconds = {}, 0.0
    student = quantize.fold_batchnorm(student) if has_bn else student
    qat = tuning.make_qat(student)
    rest = dataclasses.replace(plan, finetune_steps=total - first)
    result = run(qat, rest, first)
    qat.eval()
    stopped = (f"early-stopped at step {first + result.steps}: {result.reason}"
               if result.stopped_early else None)
    for key, value in result.seconds.items():
        seconds[key] = round(seconds.get(key, 0.0) + value, 4)
    return TuningResult(student, qat, first + result.steps, first, stopped, seconds,
                        recovery_seconds)


def early_stop_checkpoints(total: int) -> frozenset[int]:
    """The steps where the early-stop rule looks: half-way and three-quarters of the way,
    never the last step (see ``is_hopeless``)."""
    return frozenset(s for s in (max(1, total // 2), max(1, (3 * total) // 4)) if s < total)


def is_hopeless(step: int, accuracy: float, *, total: int, floor: float) -> bool:
    """Our early-stop rule: from half-way, a candidate below ``floor`` is abandoned; never at
    the last step, because a finished fine-tune is measured however it scored."""
    return max(1, total // 2) <= step < total and accuracy < floor


__all__ = ["RECOVERY_SHARE", "TrialTuning", "TuningResult", "early_stop_checkpoints",
           "finetune_trial", "is_hopeless", "recovers", "recovery_steps"]
