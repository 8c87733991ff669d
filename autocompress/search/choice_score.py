"""Scoring one sensitivity choice against the teacher: the fixed validation slice, the
damage (KL to the teacher's outputs, or scaled MSE for values) and the task's figure, and the
weight shares a pruned copy kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.intake import Task
from autocompress.intake.metric import Metric

SCORE_BATCH = 128


def fixed_slice(task: Task, images: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``images`` validation images (unshuffled: the same slice every time)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    count = 0
    for x, y in task.data.batches("val", SCORE_BATCH):
        xs.append(x[: images - count])
        ys.append(y[: images - count])
        count += int(xs[-1].shape[0])
        if count >= images:
            break
    return xs, ys


def score_choice(
    model: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    metric: Metric,
) -> tuple[float, float]:
    """The damage against the teacher and the task's figure (top-1 accuracy by default).

    Damage is the mean KL(teacher || model) per sample over logits (classes on dimension 1,
    per-pixel logits averaged over positions); for float targets (values, not logits) it is
    the mean squared error to the teacher's outputs over their variance, scale-free too."""
    model.eval()
    values = bool(ys) and ys[0].is_floating_point()
    total = 0.0
    outputs = []
    with torch.no_grad():
        for x, t in zip(xs, teacher_logits, strict=True):
            out = model(x)
            outputs.append(out)
            if values:
                total += float(F.mse_loss(out, t, reduction="sum"))
            else:
                kl = F.kl_div(F.log_softmax(out, dim=1), F.log_softmax(t, dim=1),
                              reduction="sum", log_target=True)
                total += float(kl) / max(1, out[0].numel() // max(1, out.shape[1]))
    n = sum(int(x.shape[0]) for x in xs)
    damage = total / max(n, 1)
    if values:
        teacher = torch.cat(teacher_logits)
        damage /= max(float(teacher.var(unbiased=False)) * teacher[0].numel(), 1e-12)
    return (damage if math.isfinite(damage) else 1e3), figure(outputs, ys, metric)


def figure(outputs: list[torch.Tensor], ys: list[torch.Tensor], metric: Metric) -> float:
    """The task's figure on the slice (recorded as ``accuracy`` for people to read)."""
    return metric.score_batches((out.numpy(), y.numpy()) for out, y in zip(outputs, ys,
                                                                         strict=True))


def weight_numel(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


def kept_shares(model: nn.Module, teacher_weights: dict[str, int]) -> dict[str, float]:
    """Share of each layer's weight elements a pruned model kept (only the layers that lost
    some): channel pruning shrinks both the group's layers and their consumers. BatchNorms,
    folded away in the student, are not layers of the file."""
    kept: dict[str, float] = {}
    for name, module in model.named_modules():
        before = teacher_weights.get(name, 0)
        after = weight_numel(module)
        if before and 0 < after < before:
            kept[name] = round(after / before, 6)
    return kept


__all__ = ["figure", "fixed_slice", "kept_shares", "score_choice", "weight_numel"]
