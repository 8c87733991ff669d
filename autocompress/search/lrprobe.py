"""Choose the fine-tune learning rate for one study, by measurement, when the user gave none.

No single default suits every teacher. Measured with AdamW on BN-folded students: the digits
demo CNN, 50% pruned at int4, recovers to 0.99 at 2e-3 but only 0.88 at 2e-4 in 150 steps,
while the ResNet-20 CIFAR-10 teacher at uniform int8 falls from 0.76 to 0.10 validation
accuracy within 5 steps at 2e-3 and holds 0.75 at 2e-4. So the probe fine-tunes the least
damaged candidate a search can hold (every layer at the narrowest width above 4 bits in the
space, nothing pruned) for a few steps at each of a few learning rates, and keeps the largest
rate whose accuracy comes within ``TOLERANCE`` of the best: as fast as possible, as long as it
does no harm. The result is stored on the study, so resumed runs and other workers reuse it.

The rates are walked as a line search, not a sweep: from the grid's smallest rate (a rate
that small rarely harms a student, so a walk cut short by time still leaves a safe choice),
down while a smaller rate gains more than the tolerance and the best still hurts the student
(below the grid: ``BELOW``), then up while a larger rate stays within the tolerance of the
best. A pretrained transformer needs rates a CNN never does: on MiniLM (sentiment, 30
steps at int8) every rate of the CNN grid lost accuracy (start 0.810: 3e-3 -> 0.590, 3e-4 ->
0.711, 1e-4 -> 0.792). Under a time limit the probe takes at most ``PROBE_SHARE`` of it:
fewer validation batches when one evaluation is slow, and no further rate once the next
would not fit, even when only the first (the grid's smallest, the safest) was scored (the
same sweep took 6 of a 12-minute run's minutes on MiniLM; started from 3e-4 with time for
one rate, a bounded walk kept 3e-4 at 0.715 against the student's 0.789).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autocompress.config.settings import SpaceSettings, TrainingSettings
from autocompress.errors import TrainingError
from autocompress.intake import Task
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.train import distill
from autocompress.train.losses import TaskLossError
from autocompress.transform import quantize
from autocompress.transform.student import build_student, torch_accuracy

CANDIDATES = (3e-3, 1e-3, 3e-4, 1e-4)
BELOW = (3e-5, 1e-5)  # tried only while each smaller rate still gains (pretrained transformers)
PROBE_STEPS = 20  # collapse at a too-high rate shows within 5 steps on ResNet-20
# Under a time bound, fewer steps when one costs a lot (resnet18 at 224x224 on 2 cores: ~15 s
# a step, 20 steps took the whole of a 4-minute limit): never fewer than these.
MIN_PROBE_STEPS = 3
PROBE_EVAL_BATCHES = 4  # x 256 validation images
TOLERANCE = 0.01  # accuracy (absolute) a faster rate may give up against the best one
PROBE_SHARE = 0.10  # of a time-limited search
EVAL_SHARE = 0.25  # of the probe's time for its evaluations (the start and each rate)
# Under a time bound the probe stops as soon as the next rate would overrun its share, even
# after one rate (two used to be scored whatever the bound: a ResNet-20 search's probe and
# sensitivity pass overran their shares and the run ended 4 minutes past its limit); it
# works with what it scored: one rate, the grid's smallest, is the safest choice.


@dataclass(frozen=True)
class LearningRateProbe:
    """What the probe measured: accuracy before and after ``steps`` steps at each rate."""

    chosen: float
    start_accuracy: float
    scores: dict[float, float]
    steps: int
    bits: int
    seconds: float = 0.0  # the probe's wall time: a first estimate of a trial's fine-tune

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen,
            "start_accuracy": self.start_accuracy,
            # a diverged rate scores -inf (below any metric, negated ones included): null
            "scores": {f"{lr:g}": acc if math.isfinite(acc) else None
                       for lr, acc in self.scores.items()},
            "steps": self.steps,
            "bits": self.bits,
            "seconds": round(self.seconds, 3),
        }

    def describe(self) -> str:
        tried = ", ".join(f"{lr:g} -> {acc:.3f}" for lr, acc in self.scores.items())
        return (f"learning rate {self.chosen:g} chosen by probe ({self.steps} steps at int"
                f"{self.bits}, start {self.start_accuracy:.3f}: {tried})")


def choose(scores: dict[float, float], tolerance: float = TOLERANCE) -> float:
    """The largest rate whose accuracy is within ``tolerance`` of the best one; the smallest
    rate scored when every one diverged (no evidence for a faster one)."""
    best = max(scores.values())
    if best == -math.inf:
        return min(scores)
    return max(lr for lr, acc in scores.items() if acc >= best - tolerance)


def probe_seconds(time_limit_minutes: float | None) -> float | None:
    """The time the probe may take in a search with this time limit (None: unbounded)."""
    return None if time_limit_minutes is None else PROBE_SHARE * 60.0 * time_limit_minutes


def walk(score: Callable[[float], float], ladder: tuple[float, ...], first: int, start: float,
         out_of_time: Callable[[], bool], tolerance: float = TOLERANCE) -> dict[float, float]:
    """The line search over ``ladder`` (descending rates) from ``ladder[first]`` that
    ``probe_learning_rate`` runs, ``score`` giving a rate's accuracy after the probe's
    fine-tune and ``start`` the student's before it (see the module doc). Returns every rate
    scored; ``out_of_time`` ends it before the next rate."""
    scores: dict[float, float] = {}

    def best() -> float:
        return max(scores.values())

    scores[ladder[first]] = score(ladder[first])
    i = first
    while i + 1 < len(ladder) and not out_of_time():  # down, while it pays and still hurts
        if best() >= start - tolerance:
            break
        before = best()
        scores[ladder[i + 1]] = score(ladder[i + 1])
        i += 1
        if scores[ladder[i]] <= before + tolerance:
            break
    i = first
    while i > 0 and not out_of_time():  # up, while the faster rate is about as good
        if scores[ladder[i]] < best() - tolerance:
            break
        scores[ladder[i - 1]] = score(ladder[i - 1])
        i -= 1
    return scores


def probe_learning_rate(
    task: Task,
    inventory: Inventory,
    space_settings: SpaceSettings,
    training: TrainingSettings,
    calibration: list[torch.Tensor],
    *,
    candidates: tuple[float, ...] = CANDIDATES,
    below: tuple[float, ...] = BELOW,
    device: str = "cpu",
    seconds: float | None = None,
) -> LearningRateProbe:
    """Fine-tune the probe student at the rates ``walk`` visits and choose (module doc): up
    from the smallest of ``candidates``, or down through ``below``; ``seconds`` bounds it."""
    started = time.perf_counter()
    widths = [b for b in space_settings.bits if b < 32]
    bits = min((b for b in widths if b > 4), default=min(widths, default=32))
    steps = min(PROBE_STEPS, max(1, space_settings.finetune_steps))
    base = space.uniform_plan(inventory, space_settings, bits=bits)
    student = build_student(task, base, training.round_to)

    def accuracy(model: torch.nn.Module, batches: int) -> float:
        val = itertools.islice(task.data.batches("val", 256), batches)
        return torch_accuracy(model.to(device), val, task.metric)

    grid = sorted(candidates, reverse=True)
    ladder = tuple(sorted({*grid, *(lr for lr in below if lr < grid[-1])}, reverse=True))
    start_model = quantize.calibrate(quantize.prepare_qat(student, base), calibration).to(device)
    eval_batches, start = _start_accuracy(accuracy, start_model, seconds, len(ladder))
    paces: list[float] = []

    def finetune(plan: CompressionPlan) -> torch.nn.Module:
        model = quantize.calibrate(quantize.prepare_qat(student, plan), calibration)
        distill.finetune(model, task.model, task.data, plan, batch_size=training.batch_size,
                         device=device, seed=training.seed, loss=task.loss)
        return model

    def score(lr: float) -> float:
        t0 = time.perf_counter()
        try:
            model = finetune(dataclasses.replace(base, learning_rate=lr, finetune_steps=steps))
        except TaskLossError:
            raise  # the task's loss is broken at every rate: say so, do not pick one
        except TrainingError:
            result = -math.inf  # the loss diverged: as bad as a rate can be
        else:
            result = accuracy(model, eval_batches)
        paces.append(time.perf_counter() - t0)
        return result

    def out_of_time() -> bool:
        return seconds is not None and time.perf_counter() - started + max(paces) > seconds

    if seconds is not None:  # one timed step: as many steps as one rate's share allows
        steps = _steps_that_fit(finetune, dataclasses.replace(base, learning_rate=grid[-1]),
                                steps, seconds)
    first = ladder.index(grid[-1])  # the grid's smallest rate
    ordered = dict(sorted(walk(score, ladder, first, start, out_of_time).items(), reverse=True))
    return LearningRateProbe(choose(ordered), start, ordered, steps, bits,
                             time.perf_counter() - started)


def _steps_that_fit(finetune: Callable[[CompressionPlan], object], plan: CompressionPlan,
                    steps: int, seconds: float) -> int:
    """Probe steps one rate may take within its share of ``seconds``, from one timed step
    of ``finetune``; never fewer than MIN_PROBE_STEPS (or ``steps``, when fewer)."""
    t0 = time.perf_counter()
    finetune(dataclasses.replace(plan, finetune_steps=1))
    fit = int((1 - EVAL_SHARE) * seconds / max(time.perf_counter() - t0, 1e-9))
    return max(min(steps, fit), min(MIN_PROBE_STEPS, steps))


def _start_accuracy(
    accuracy: Callable[[torch.nn.Module, int], float], start_model: torch.nn.Module,
    seconds: float | None, rates: int,
) -> tuple[int, float]:
    """The validation batches each evaluation uses, and the student's accuracy before any
    fine-tune. Under a time bound one batch is timed first: as many batches as a fair share
    of the time allows (the start and at most each of ``rates`` rates are evaluated)."""
    eval_batches = PROBE_EVAL_BATCHES
    one_batch: float | None = None
    if seconds is not None:
        t0 = time.perf_counter()
        one_batch = accuracy(start_model, 1)
        per_batch = time.perf_counter() - t0
        evaluations = 1 + rates  # the start and at most every rate
        eval_batches = max(1, min(PROBE_EVAL_BATCHES, int(
            EVAL_SHARE * seconds / evaluations / max(per_batch, 1e-9))))
    start = (one_batch if one_batch is not None and eval_batches == 1
             else accuracy(start_model, eval_batches))
    return eval_batches, start
