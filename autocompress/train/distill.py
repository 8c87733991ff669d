"""The bounded knowledge-distillation fine-tune loop.

A compressed candidate (pruned, fake-quantized) is repaired by a short fine-tune that
imitates the unpruned teacher:

    loss = kd_alpha * kd_loss(student, teacher, T)          # soft targets
         + (1 - kd_alpha) * cross_entropy(student, labels)  # hard targets
         + feature_weight * FeatureDistiller.loss()         # optional hidden-layer MSE

The loop is bounded (exactly ``plan.finetune_steps`` optimiser steps) and can be cut short
by the search through ``should_stop`` so hopeless candidates cost little. The losses are
``losses``'s, the feature term ``features``'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from autocompress.errors import InputError, TrainingError
from autocompress.model.plan import CompressionPlan
from autocompress.train.features import FeatureDistiller
from autocompress.train.losses import (
    checked_task_loss,
    default_hard_loss,
    kd_loss,
    match_loss,
)
from autocompress.train.teacher_cache import (
    TIME_KEYS,
    Batches,
    Feed,
    StepClock,
    TeacherCache,
    cycle_batches,
)
from autocompress.transform import sparsity

__all__ = ["FinetuneResult", "finetune", "resolve_device"]

# Gradient-norm clip. Fake-quant rounding flips and freshly pruned layers give occasional
# gradient spikes; a clip keeps one bad batch from undoing the repair. Gradient norms of a
# 150-step KD repair of a 40%-pruned digits CNN ranged 0.9-3.8 (median 1.3), so the clip
# does not bind on normal steps.
_CLIP_NORM = 5.0
# final_loss is the mean of the last few step losses: one batch's loss is too noisy to
# compare candidates by.
_FINAL_LOSS_WINDOW = 10


# The part of intake.DataSplits the fine-tune needs (callers name it by this name).
_Batches = Batches


@dataclass
class FinetuneResult:
    """Outcome of one bounded fine-tune.

    steps: optimiser steps taken. final_loss: mean total loss over the last (up to) 10 steps
    (nan when no step ran). history: (step, metric) for every evaluate() call. seconds: wall
    time by phase (``teacher_cache.TIME_KEYS``): ``data`` fetching batches, ``teacher`` its
    forwards or cache reads, ``step`` the student's forward, backward and optimiser step,
    ``evaluate`` the early-stop evaluations.
    """

    steps: int
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str | torch.device, *, fallback: bool = False) -> torch.device:
    """ "cpu", "cuda" (must be available) or "auto" (cuda when available, else cpu).

    ``fallback``: an unavailable CUDA is a warning and the CPU (a search keeps going on a
    machine without a GPU); without it, an InputError (a direct call asked for CUDA)."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available() and fallback:
            logging.getLogger("autocompress").warning(
                "--device %s asked but CUDA is not available; fine-tuning on CPU", text)
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise InputError(
                f"device {text!r} was requested but CUDA is not available; use 'cpu' or 'auto'"
            )
        return torch.device(text)
    if text == "cpu":
        return torch.device("cpu")
    raise InputError(f"device {text!r} is not supported; use 'cpu', 'cuda' or 'auto'")


def _make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    # AdamW is the default. Measured on a digits CNN pruned to 60% / 50% of its channels
    # (by L1 norm) with int4 per-channel fake-quant weights, 150 KD steps, 2 seeds, val acc:
    #   lr            1e-4   3e-4   1e-3   3e-3   1e-2   3e-2
    #   keep 60% AdamW  .72    .83    .96    .98    .99    .99
    #            SGD-N  .66    .80    .93    .96    .99    .99
    #   keep 50% AdamW  .48    .71    .85    .95    .98    .99
    #            SGD-N  .47    .70    .84    .94    .98    .99
    # AdamW is better at the learning rates the search uses (plan default 1e-3, study
    # config default 2e-3) and below, and per-parameter step sizes suit a model damaged
    # very unequally (some layers pruned, some at 4 bits, some untouched) where one global
    # SGD step size fits none. SGD only catches up at learning rates ~10x higher.
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    raise InputError(f"optimizer {name!r} is not supported; use 'adamw' or 'sgd'")


_cycle_batches = cycle_batches  # the uncached stream (tests and callers name it here)


@dataclass(frozen=True)
class _Loop:
    """The fine-tune's settings besides the models, data and plan (see ``finetune``)."""

    batch_size: int
    evaluate: Callable[[nn.Module], float] | None
    eval_every: int
    should_stop: Callable[[int, float], bool] | None
    seed: int
    log: Callable[[str], None] | None
    optimizer: str
    evaluate_at: Callable[[int], bool] | None
    progress: Callable[[int, int], None] | None
    hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    cache: TeacherCache | None
    start: int


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: _Batches,
    plan: CompressionPlan,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: int = 50,
    should_stop: Callable[[int, float], bool] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    optimizer: str = "adamw",
    evaluate_at: Callable[[int], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher_cache: TeacherCache | None = None,
    start: int = 0,
) -> FinetuneResult:
    """Distil ``teacher`` into ``student`` in place for exactly ``plan.finetune_steps`` steps.

    Every ``eval_every`` steps ``evaluate(student)`` is called (student in eval mode, on the
    training device, under no_grad) and ``should_stop(step, metric)`` may end the run early.
    ``evaluate_at(step)``, when given, further limits those steps to the ones where the
    metric can matter (evaluations cost forward passes over the validation data).
    ``progress(step, total)``, when given, is called after every step (progress bars).
    ``loss(outputs, targets)`` replaces cross-entropy as the hard-target term (a task's own).
    ``teacher_cache``, when given, is the batch stream instead of one seeded by ``seed``: the
    run reads its positions ``start``, ``start + 1``, ... and the teacher's outputs on them
    from it (computed on first use; with feature distillation the teacher still runs, for its
    hidden features). ``seed`` still seeds adapter init and dropout. Without it ``start`` is
    ignored (the run's own stream, seeded by ``seed``, has no positions). Raises
    TrainingError when the loss becomes nan/inf. Both models end on the CPU in the train/eval
    mode they arrived in. The run is deterministic for a given ``seed`` (same
    data order, adapter init and dropout masks); the global RNG state is left untouched.
    """
    loop = _Loop(batch_size, evaluate, eval_every, should_stop, seed, log, optimizer,
                 evaluate_at, progress, loss, teacher_cache, start)
    _check_loop(loop)
    if plan.finetune_steps == 0:
        return FinetuneResult(0, math.nan, [], False, "finetune_steps is 0: nothing to do",
                              dict.fromkeys(TIME_KEYS, 0.0))

    dev = resolve_device(device)
    modes = (student.training, teacher.training)
    # fork_rng: seeding here must not change the caller's random stream (Optuna samplers
    # and data loaders elsewhere draw from it).
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            student.to(dev)
            teacher.to(dev)
            teacher.eval()
            return _run(student, teacher, data, plan, dev, loop)
        finally:
            student.to("cpu")
            teacher.to("cpu")
            student.train(modes[0])
            teacher.train(modes[1])


def _check_loop(loop: _Loop) -> None:
    if loop.batch_size < 1:
        raise InputError(f"batch_size {loop.batch_size} must be >= 1 (try 64)")
    if loop.eval_every < 1:
        raise InputError(f"eval_every {loop.eval_every} must be >= 1 (try 50)")
    if loop.should_stop is not None and loop.evaluate is None:
        raise InputError("should_stop needs an evaluate callback to produce the metric it sees")
    if loop.start < 0:
        raise InputError(f"start {loop.start} must be >= 0")
    if loop.cache is not None and loop.cache.batch_size != loop.batch_size:
        raise InputError(f"batch_size {loop.batch_size} differs from the teacher cache's "
                         f"{loop.cache.batch_size}")


def _run(
    student: nn.Module,
    teacher: nn.Module,
    data: _Batches,
    plan: CompressionPlan,
    dev: torch.device,
    loop: _Loop,
) -> FinetuneResult:
    distiller: FeatureDistiller | None = None
    if plan.feature_weight > 0 and len(plan.feature_pairs) > 0:
        # The first training batch doubles as the probe input: same shapes as training.
        x0 = (next(cycle_batches(data, loop.batch_size, loop.seed))[0] if loop.cache is None
              else loop.cache.batch(loop.start)[0])
        distiller = FeatureDistiller(student, teacher, plan.feature_pairs, x0.to(dev)).to(dev)

    # The plan's unstructured zeros, put back after every step (a step refills them).
    masks = sparsity.ZeroMasks(student, sparsity.planned_layers(student, plan)).to(dev)
    try:
        params = [p for p in student.parameters() if p.requires_grad]
        if distiller is not None:
            params += list(distiller.parameters())
        if not params:
            raise TrainingError("the student has no trainable parameters; nothing to fine-tune")
        return _train(student, teacher, data, plan, dev, loop, distiller, masks, params)
    finally:
        if distiller is not None:
            distiller.close()


def _train(
    student: nn.Module,
    teacher: nn.Module,
    data: _Batches,
    plan: CompressionPlan,
    dev: torch.device,
    loop: _Loop,
    distiller: FeatureDistiller | None,
    masks: sparsity.ZeroMasks,
    params: list[nn.Parameter],
) -> FinetuneResult:
    """The ``plan.finetune_steps`` optimiser steps, evaluated and logged as ``loop`` says."""
    steps = plan.finetune_steps
    clock = StepClock(dev)
    source = (loop.cache if loop.cache is not None
              else cycle_batches(data, loop.batch_size, loop.seed))
    feed = Feed(teacher, dev, clock, source, loop.start)
    opt = _make_optimizer(params, loop.optimizer, plan.learning_rate)
    # Cosine decay from plan.learning_rate to 0 over exactly `steps` steps.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps))
    )
    history: list[tuple[int, float]] = []
    recent: list[float] = []
    student.train()
    if distiller is not None:
        distiller.train()
    for step in range(1, steps + 1):
        x, y = feed.batch(step)
        with clock.phase("step"):
            s_logits = student(x)
        # Feature distillation needs the teacher's hidden features: it runs on every batch.
        t_logits = feed.teacher_outputs(step, x, cached=distiller is None)
        with clock.phase("step"):
            loss = _step_loss(s_logits, t_logits, distiller, plan, y, loop.hard_loss)
            value = _apply(loss, opt, sched, params, masks, step)
        recent.append(value)
        del recent[:-_FINAL_LOSS_WINDOW]
        if loop.progress is not None:
            loop.progress(step, steps)
        with clock.phase("evaluate"):
            stop = _check_in(student, distiller, loop, step, steps, value, history)
        if stop is not None:
            return FinetuneResult(step, _mean(recent), history, True, stop, clock.seconds)
    return FinetuneResult(steps, _mean(recent), history, False, f"completed {steps} steps",
                          clock.seconds)


def _apply(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    params: list[nn.Parameter],
    masks: sparsity.ZeroMasks,
    step: int,
) -> float:
    """One optimiser step on ``loss`` (refused when it is nan/inf); the loss's value."""
    value = float(loss.detach())
    if not math.isfinite(value):
        lr_now = opt.param_groups[0]["lr"]
        raise TrainingError(
            f"loss became {value} at step {step}; lower the learning rate "
            f"(now {lr_now:.3g})"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, _CLIP_NORM)
    opt.step()
    masks.restore()
    sched.step()
    return value


def _check_in(
    student: nn.Module,
    distiller: FeatureDistiller | None,
    loop: _Loop,
    step: int,
    steps: int,
    value: float,
    history: list[tuple[int, float]],
) -> str | None:
    """Evaluate (into ``history``) and log at the steps due: why to stop, or None."""
    due = step % loop.eval_every == 0 and (loop.evaluate_at is None or loop.evaluate_at(step))
    if loop.evaluate is not None and due:
        metric = _evaluate(student, distiller, loop.evaluate)
        history.append((step, metric))
        if loop.log is not None:
            loop.log(f"step {step}/{steps} loss {value:.4f} metric {metric:.4f}")
        if loop.should_stop is not None and loop.should_stop(step, metric):
            return f"should_stop at step {step}/{steps} (metric {metric:.4f})"
    elif loop.log is not None and step % loop.eval_every == 0:
        loop.log(f"step {step}/{steps} loss {value:.4f}")
    return None


def _step_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    distiller: FeatureDistiller | None,
    plan: CompressionPlan,
    y: torch.Tensor,
    hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The step's total loss from the student's and the teacher's outputs."""
    alpha = plan.kd_alpha
    loss = s_logits.new_zeros(())
    if alpha > 0:
        # Float targets mean the outputs are values: softened softmaxes would compare
        # nothing meaningful, so the student matches the teacher's outputs instead.
        soft = (match_loss(s_logits, t_logits) if y.is_floating_point()
                else kd_loss(s_logits, t_logits, plan.kd_temperature))
        loss = loss + alpha * soft
    if alpha < 1:
        hard = (default_hard_loss(s_logits, y) if hard_loss is None
                else checked_task_loss(hard_loss, s_logits, y))
        loss = loss + (1.0 - alpha) * hard
    if distiller is not None:
        loss = loss + plan.feature_weight * distiller.loss()
    return loss


def _evaluate(
    student: nn.Module,
    distiller: FeatureDistiller | None,
    evaluate: Callable[[nn.Module], float],
) -> float:
    student.eval()
    try:
        with torch.no_grad():
            metric = float(evaluate(student))
    finally:
        student.train()
        if distiller is not None:
            distiller.clear()  # evaluate()'s forwards fired the student hooks
    return metric


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
