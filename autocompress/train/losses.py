"""Distillation losses: Hinton's logit KD, output matching for values, the hard-target term a
task without its own loss gets, and the check of a task's own loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from autocompress.errors import InputError, TrainingError, one_line

__all__ = ["TaskLossError", "checked_task_loss", "default_hard_loss", "kd_loss", "match_loss"]

_FIX = "fix `loss` in your --task factory"


class TaskLossError(TrainingError):
    """The task's own loss raised, or returned something a fine-tune cannot use (NaN/inf on
    finite outputs, not one number): every trial would fail the same way, so it ends a run."""


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton KD loss: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch.

    The T^2 factor keeps the soft-target gradient magnitude independent of T (gradients of
    the softened KL scale as 1/T^2), so kd_alpha means the same thing at every temperature.
    Logits are (N, C), or (N, C, ...) (per-pixel logits: classes on dimension 1, averaged
    over samples and positions); teacher logits are treated as constants.
    """
    if not temperature > 0:
        raise InputError(f"temperature {temperature} must be > 0 (try 4)")
    if student_logits.shape != teacher_logits.shape:
        raise InputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; both models must predict the "
            "same classes"
        )
    if student_logits.ndim < 2:
        raise InputError(f"logits {tuple(student_logits.shape)} have no class dimension; a "
                         "task whose outputs are values should yield float targets")
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    positions = max(1, student_logits.numel() // max(1, student_logits.shape[1]))
    return kl / positions * (t * t)


def match_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Distillation of values (regression outputs): mean squared error to the teacher's."""
    if student_out.shape != teacher_out.shape:
        raise InputError(f"student outputs {tuple(student_out.shape)} and teacher outputs "
                         f"{tuple(teacher_out.shape)} differ in shape")
    return F.mse_loss(student_out, teacher_out.detach())


def default_hard_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The hard-target term a task without its own loss gets: cross-entropy on integer
    targets (class labels, per-pixel masks), mean squared error on float ones (values; a
    (N,) target meets a (N, 1) output)."""
    if not targets.is_floating_point():
        return F.cross_entropy(outputs, targets)
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets)


def checked_task_loss(
    loss: Callable[[torch.Tensor, torch.Tensor], Any], outputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The task's own loss on a batch, as a 0-d tensor; a one-line TaskLossError when it
    raises, returns no tensor or more than one number, or NaN/inf while the outputs are
    finite (non-finite outputs are a diverging fine-tune: not the loss's fault)."""
    shapes = f"outputs {list(outputs.shape)}, targets {list(targets.shape)}"
    try:
        value = loss(outputs, targets)
    except Exception as exc:  # the user's code: one line, not a traceback per trial
        raise TaskLossError(f"the task's loss raised {one_line(exc, typed=True)} on {shapes}; "
                            f"{_FIX}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = (f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise TaskLossError(
            f"the task's loss returned {got} on {shapes}; it must return one number as a "
            f"tensor (reduce over the batch, e.g. .mean()): {_FIX}")
    number = float(value.detach())
    if not math.isfinite(number) and bool(torch.isfinite(outputs.detach()).all()):
        raise TaskLossError(f"the task's loss returned {number} on finite {shapes}; it must "
                            f"return a finite number for every batch: {_FIX}")
    return value.reshape(())
