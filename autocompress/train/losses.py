"""Distillation losses: Hinton's logit KD, output matching for values, and the hard-target
term a task without its own loss gets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autocompress.errors import InputError

__all__ = ["default_hard_loss", "kd_loss", "match_loss"]


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
