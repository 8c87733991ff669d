"""A trial's fine-tune: recovery (plans that prune), then QAT + KD from the teacher, with
early stopping.

Early stopping (ours: multi-objective Optuna cannot prune): half-way and three-quarters of the
way through the fine-tune, a candidate whose fake-quant validation accuracy is more than
``early_stop_drop`` (absolute) below the fp32 teacher's is abandoned as hopeless and recorded
as a PRUNED trial with the reason. Under budgets the bar is the best trial measured within
them (less the same drop), and there is none until one was: under a latency budget that
only heavy pruning meets (ResNet-20 at 0.48x of fp32), every plan inside it lost more than
5 points, every one was stopped, and the search ended with nothing measured in budget.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from torch import nn

from autocompress import study as study_mod
from autocompress.model.plan import CompressionPlan
from autocompress.study import attrs as trial_attrs
from autocompress.train import tuning
from autocompress.transform.student import torch_accuracy
from autocompress.trial.build import untrained_qat
from autocompress.trial.context import SearchContext

EARLY_STOP_BATCHES = 4  # x 256 validation images per early-stop evaluation


def finetune_trial(
    ctx: SearchContext, trial: Any, student: nn.Module, plan: CompressionPlan, *,
    early_stop: bool = True, start: int = 0,
) -> tuple[nn.Module, nn.Module, str | None]:
    """Recovery (plans that prune) and QAT + KD from the teacher (``tuning``); returns the
    folded student, the QAT model and the early-stop reason, if any (``early_stop=False``:
    a retrain of a plan that earned it runs to the end)."""
    training = ctx.training

    def evaluate(model: nn.Module) -> float:
        # A coarse look is enough to call a candidate hopeless: a fixed slice of the
        # validation split (on CIFAR-10 the full 5,000 images cost more than the
        # fine-tune itself). Recorded accuracy is always the exported file's, on all of it.
        return torch_accuracy(model, itertools.islice(
            ctx.task.data.batches("val", 256), EARLY_STOP_BATCHES), ctx.task.metric)

    result = tuning.finetune_trial(student, ctx.task.model, ctx.task.data, plan,
                                   tuning.TrialTuning(
        batch_size=training.batch_size, device=str(ctx.device),
        seed=training.seed + trial.number,
        floor=early_stop_floor(ctx, trial), evaluate=evaluate,
        make_qat=lambda folded: untrained_qat(ctx, folded, plan), early_stop=early_stop,
        progress=ctx.on_step, loss=ctx.task.loss,
        teacher_cache=ctx.teacher_cache, start=start))
    trial.set_user_attr(trial_attrs.FINETUNE_STEPS_RUN, result.steps)
    if result.seconds:  # where the fine-tune's time went (data, teacher, step, evaluate)
        trial.set_user_attr(trial_attrs.FINETUNE_SECONDS, json.dumps(result.seconds))
    if result.recovery_steps:
        trial.set_user_attr(trial_attrs.RECOVERY_STEPS, result.recovery_steps)
        trial.set_user_attr(trial_attrs.RECOVERY_SECONDS, result.recovery_seconds)
    return result.student, result.qat, result.stopped


def early_stop_floor(ctx: SearchContext, trial: Any) -> float:
    """The accuracy under which a fine-tune is abandoned (module docstring)."""
    floor = ctx.fp32_accuracy - ctx.training.early_stop_drop
    if not ctx.budgets:
        return floor
    within = [r.accuracy for r in study_mod.records(trial.study)
              if r.measured and r.feasible and r.accuracy is not None]
    if not within:
        return -math.inf
    return min(floor, max(within) - ctx.training.early_stop_drop)
