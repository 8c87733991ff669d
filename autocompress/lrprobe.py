"""Choose the fine-tune learning rate for one study, by measurement, when the user gave none.

No single default suits every teacher. Measured with AdamW on BN-folded students: the digits
demo CNN, 50% pruned at int4, recovers to 0.99 at 2e-3 but only 0.88 at 2e-4 in 150 steps,
while the ResNet-20 CIFAR-10 teacher at uniform int8 falls from 0.76 to 0.10 validation
accuracy within 5 steps at 2e-3 and holds 0.75 at 2e-4. So the probe fine-tunes the least
damaged candidate a search can hold (every layer at the narrowest width above 4 bits in the
space, nothing pruned) for a few steps at each of a few learning rates, and keeps the largest
rate whose accuracy comes within ``TOLERANCE`` of the best: as fast as possible, as long as it
does no harm. The result is stored on the study, so resumed runs and other workers reuse it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from autocompress import distill, quantize, space
from autocompress.config import SearchConfig
from autocompress.errors import TrainingError
from autocompress.intake import Task
from autocompress.inventory import Inventory
from autocompress.objective import build_student, torch_accuracy
from autocompress.plan import CompressionPlan

CANDIDATES = (3e-3, 1e-3, 3e-4, 1e-4)
PROBE_STEPS = 20  # collapse at a too-high rate shows within 5 steps on ResNet-20
PROBE_EVAL_BATCHES = 4  # x 256 validation images
TOLERANCE = 0.01  # accuracy (absolute) a faster rate may give up against the best one


@dataclass(frozen=True)
class LearningRateProbe:
    """What the probe measured: accuracy before and after ``steps`` steps at each rate."""

    chosen: float
    start_accuracy: float
    scores: dict[float, float]
    steps: int
    bits: int

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen,
            "start_accuracy": self.start_accuracy,
            # a diverged rate scores -inf (below any metric, negated ones included): null
            "scores": {f"{lr:g}": acc if math.isfinite(acc) else None
                       for lr, acc in self.scores.items()},
            "steps": self.steps,
            "bits": self.bits,
        }

    def describe(self) -> str:
        tried = ", ".join(f"{lr:g} -> {acc:.3f}" for lr, acc in self.scores.items())
        return (f"learning rate {self.chosen:g} chosen by probe ({self.steps} steps at int"
                f"{self.bits}, start {self.start_accuracy:.3f}: {tried})")


def choose(scores: dict[float, float], tolerance: float = TOLERANCE) -> float:
    """The largest rate whose accuracy is within ``tolerance`` of the best one."""
    best = max(scores.values())
    return max(lr for lr, acc in scores.items() if acc >= best - tolerance)


def probe_learning_rate(
    task: Task,
    inventory: Inventory,
    config: SearchConfig,
    calibration: list[torch.Tensor],
    *,
    candidates: tuple[float, ...] = CANDIDATES,
    device: str = "cpu",
) -> LearningRateProbe:
    """Fine-tune the probe student at each of ``candidates`` and choose (see module doc)."""
    widths = [b for b in config.bits if b < 32]
    bits = min((b for b in widths if b > 4), default=min(widths, default=32))
    steps = min(PROBE_STEPS, max(1, config.finetune_steps))
    base = space.uniform_plan(inventory, config, bits=bits)
    student = build_student(task, base, config.round_to)

    def accuracy(model: torch.nn.Module) -> float:
        val = itertools.islice(task.data.batches("val", 256), PROBE_EVAL_BATCHES)
        return torch_accuracy(model.to(device), val, task.metric)

    def calibrated(plan: CompressionPlan) -> torch.nn.Module:
        model = quantize.prepare_qat(student, plan)
        quantize.calibrate(model, calibration)
        return model

    start = accuracy(calibrated(base))
    scores: dict[float, float] = {}
    for lr in candidates:
        plan = dataclasses.replace(base, learning_rate=lr, finetune_steps=steps)
        model = calibrated(plan)
        try:
            distill.finetune(model, task.model, task.data, plan, batch_size=config.batch_size,
                             device=device, seed=config.seed, loss=task.loss)
        except TrainingError:
            scores[lr] = -math.inf  # the loss diverged: as bad as a rate can be
            continue
        scores[lr] = accuracy(model)
    return LearningRateProbe(choose(scores), start, scores, steps, bits)
