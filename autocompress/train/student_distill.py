"""Whole-epoch distillation of a different architecture (a student) from the teacher.

``--student SPEC`` (``search/students.py``) trains a smaller architecture from its own
initialisation, once per study, before the search compresses it as a second base model:

    loss = alpha * kd_loss(student, teacher, T)           # Hinton logit KD
         + (1 - alpha) * hard loss (cross-entropy)         # labels
         + feature_weight * FeatureDistiller.loss()        # paired hidden features, if any

Layer pairing (``pair_layers``): the two models' top-level children are run once on the
example input; for every spatial size (H, W) > 1 both models produce, the last child (in
forward order) that outputs a 4-D tensor at that size is paired with the other model's.
On CIFAR ResNets that pairs the stages (layer1/layer2/layer3 of a ResNet-20 with those of a
ResNet-8); channel counts may differ (``FeatureDistiller``'s learned 1x1 adapters map them).
Models without such outputs (a text classifier) get logit KD only, and the empty pairing is
recorded so.

The recipe is SGD with Nesterov momentum, cosine decay over the planned epochs; the loop
stops between epochs when ``keep_going`` says the time is up (whole epochs only, at least
one), and reports each epoch through ``on_epoch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autocompress.intake.outputs import first_tensor, prediction_of
from autocompress.train.features import FeatureDistiller
from autocompress.train.losses import checked_task_loss, default_hard_loss, kd_loss, match_loss

__all__ = ["StudentRecipe", "StudentResult", "distil_student", "pair_layers"]

_CLIP_NORM = 5.0


@dataclass(frozen=True)
class StudentRecipe:
    """How a student is distilled (plain numbers, recorded on its trial)."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 4.0
    alpha: float = 0.9  # share of the soft (KD) term; the rest is the hard label loss
    feature_weight: float = 1.0  # of the paired-feature MSE (0: logit KD only)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StudentResult:
    """What the distillation did: epochs run, per-epoch mean loss and seconds, the pairing."""

    epochs_run: int
    epochs_planned: int
    steps: int
    seconds: float
    pairing: list[tuple[str, str]]
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    stopped: str | None = None  # why fewer epochs than planned ran

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "epochs_planned": self.epochs_planned,
                "steps": self.steps, "seconds": round(self.seconds, 2),
                "pairing": [list(p) for p in self.pairing],
                "epoch_losses": [round(v, 5) for v in self.epoch_losses],
                "epoch_seconds": [round(v, 2) for v in self.epoch_seconds],
                "stopped": self.stopped}


def _stage_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(child name, output shape) of the model's top-level children in forward order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, child in model.named_children():
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            tensor = first_tensor(out)
            if tensor is not None:
                seen.append((name, tuple(tensor.shape)))
        handles.append(child.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _last_by_size(outputs: list[tuple[str, tuple[int, ...]]]) -> dict[tuple[int, ...], str]:
    """Spatial size -> the last child producing a 4-D output of that size (> 1x1)."""
    last: dict[tuple[int, ...], str] = {}
    for name, shape in outputs:
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            last[shape[2:]] = name
    return last


def pair_layers(student: nn.Module, teacher: nn.Module,
                example: torch.Tensor) -> list[tuple[str, str]]:
    """(student layer, teacher layer) pairs at the spatial sizes both models produce,
    largest resolution first; empty when none can be paired."""
    s = _last_by_size(_stage_outputs(student, example))
    t = _last_by_size(_stage_outputs(teacher, example))
    shared = sorted(set(s) & set(t), key=lambda size: -math.prod(size))
    # a child named once for two sizes (it is called twice) keeps its last size only
    pairs = [(s[size], t[size]) for size in shared]
    return list(dict.fromkeys(pairs))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    pred = prediction_of(out)
    return pred if pred is not None else out


def distil_student(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    recipe: StudentRecipe,
    *,
    device: str | torch.device = "cpu",
    hard_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    keep_going: Callable[[int, float], bool] | None = None,
    on_epoch: Callable[[int, int, float, float], None] | None = None,
) -> StudentResult:
    """Distil ``teacher`` into ``student`` (trained in place) for ``recipe.epochs`` passes
    over ``data``'s train split. ``keep_going(epochs_done, seconds_per_epoch)`` is asked
    before every epoch after the first; ``on_epoch(done, planned, loss, seconds)`` after
    each. Returns the student in eval mode's record of what ran."""
    dev = torch.device(device)
    student.to(dev).train()
    teacher.to(dev).eval()
    example = data.example_input(2).to(dev)
    pairs = pair_layers(student, teacher, example) if recipe.feature_weight > 0 else []
    distiller = FeatureDistiller(student, teacher, pairs, example).to(dev) if pairs else None
    params = [*student.parameters(), *(distiller.parameters() if distiller else [])]
    opt = torch.optim.SGD(params, lr=recipe.learning_rate, momentum=recipe.momentum,
                          nesterov=True, weight_decay=recipe.weight_decay)
    per_epoch = max(1, math.ceil(len(data.split("train")) / recipe.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs * per_epoch)
    result = StudentResult(0, recipe.epochs, 0, 0.0, pairs)
    started = time.perf_counter()
    try:
        for epoch in range(recipe.epochs):
            mean_s = (time.perf_counter() - started) / epoch if epoch else 0.0
            if epoch and keep_going is not None and not keep_going(epoch, mean_s):
                result.stopped = f"time limit: {epoch} of {recipe.epochs} epochs fitted"
                break
            tick = time.perf_counter()
            loss = _epoch(student, teacher, distiller, opt, sched, data, recipe, dev, epoch,
                          hard_loss)
            result.epoch_losses.append(loss)
            result.epoch_seconds.append(time.perf_counter() - tick)
            result.epochs_run = epoch + 1
            result.steps += per_epoch
            if on_epoch is not None:
                on_epoch(epoch + 1, recipe.epochs, loss, result.epoch_seconds[-1])
    finally:
        if distiller is not None:
            distiller.close()
    result.seconds = time.perf_counter() - started
    student.cpu().eval()
    teacher.cpu()
    return result


def _epoch(
    student: nn.Module, teacher: nn.Module, distiller: FeatureDistiller | None,
    opt: torch.optim.Optimizer, sched: Any, data: Any, recipe: StudentRecipe,
    dev: torch.device, epoch: int, hard_loss: Callable[..., Any] | None,
) -> float:
    """One pass over the train split; returns the mean step loss."""
    total, count = 0.0, 0
    for x, y in data.batches("train", recipe.batch_size, shuffle=True,
                             seed=recipe.seed + epoch):
        x, y = x.to(dev), y.to(dev)
        with torch.no_grad():
            t_out = _outputs(teacher, x)
        s_out = _outputs(student, x)
        # float targets are values: match the teacher's outputs, not softened softmaxes
        soft = (match_loss(s_out, t_out) if y.is_floating_point()
                else kd_loss(s_out, t_out, recipe.temperature))
        loss = recipe.alpha * soft
        if recipe.alpha < 1:
            hard = (default_hard_loss(s_out, y) if hard_loss is None
                    else checked_task_loss(hard_loss, s_out, y))
            loss = loss + (1.0 - recipe.alpha) * hard
        if distiller is not None:
            loss = loss + recipe.feature_weight * distiller.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), _CLIP_NORM)
        opt.step()
        sched.step()
        total += float(loss.detach())
        count += 1
    return total / max(count, 1)
