"""A plan's student: the pruned, BatchNorm-refreshed, BatchNorm-folded float structure.

``build_student`` is what every trial, the sensitivity pass, the learning-rate probe and
``rebuild`` start from; ``torch_accuracy`` scores a PyTorch model on (x, y) batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.intake.metric import TOP1, Metric
from autocompress.model.plan import CompressionPlan
from autocompress.transform import batchnorm, prune, quantize, sparsity

if TYPE_CHECKING:
    from autocompress.intake import Task

BN_RECALIBRATION_BATCHES = 10  # x config.batch_size training images, after pruning


def build_student(
    task: Task,
    plan: CompressionPlan,
    round_to: int,
    *,
    bn_batches: Iterable[torch.Tensor] | None = None,
    fold: bool = True,
) -> nn.Module:
    """The pruned, BN-folded float structure of a plan (teacher untouched).

    With ``bn_batches`` (training inputs), a plan that removes channels or weights gets its
    BatchNorm statistics re-estimated before they are folded away (``batchnorm.
    recalibrate_batchnorm``): the fine-tune then starts from a working model instead of
    spending its steps undoing stale statistics. Without data (structure-only rebuilds,
    latency checks) the teacher's statistics are folded as they are. ``fold=False`` keeps
    BatchNorm as modules (``tuning``'s recovery phase trains through them, then folds).
    """
    example = task.data.example_input(1)
    if any(r > 0 for r in plan.prune.values()):
        model = prune.prune(task.model, plan, example, round_to=round_to)
    else:
        model = copy.deepcopy(task.model)
    if plan.sparsity:
        model = sparsity.apply_unstructured(model, plan.sparsity)
    if plan.global_sparsity > 0:
        model = sparsity.apply_global(model, plan.global_sparsity)
    model.eval()
    if bn_batches is not None and removes_weights(plan):
        batchnorm.recalibrate_batchnorm(model, bn_batches, max_batches=BN_RECALIBRATION_BATCHES)
    return quantize.fold_batchnorm(model) if fold else model


def removes_weights(plan: CompressionPlan) -> bool:
    return any(r > 0 for r in plan.prune.values()) or plan.sparse


def torch_accuracy(model: nn.Module, batches: Any, metric: Metric | None = None) -> float:
    """The task's figure (top-1 unless ``metric`` says otherwise) of a PyTorch model over
    ``batches`` (x, y), in eval mode on the model's device; train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metric = metric or TOP1
    try:
        with torch.no_grad():
            if metric.is_top1:  # counted per batch: no copy of every output is kept
                correct = total = 0
                for x, y in batches:
                    correct += int((model(x.to(device)).argmax(dim=1).cpu() == y).sum())
                    total += int(y.numel())
                return correct / max(total, 1)
            pairs = [(model(x.to(device)).cpu().numpy(), y.cpu().numpy()) for x, y in batches]
    finally:
        model.train(was_training)
    return metric.score_batches(pairs)
