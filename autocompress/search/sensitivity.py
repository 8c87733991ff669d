"""Per-layer sensitivity: the damage of each single compression choice, nothing else changed.

Once per study, after the baselines: every quantizable layer at every width below 32 bits
(everything else float) and every prunable group at a few ratios (everything else intact,
BatchNorm statistics re-estimated as a trial does), scored against the teacher on a fixed
slice of the validation split with no fine-tune. The score is the KL divergence of the
candidate's softmax from the teacher's (smooth on a few hundred images, and additive enough
across layers to plan with, see ``guided``) plus top-1 accuracy for people to read.

The table is plain JSON stored on the study (``SENSITIVITY_ATTR``); ``autocompress
sensitivity`` prints it and ``guided`` solves for least-damage plans from it. A group entry
also records which share of each layer's weights the ratio keeps, so a plan's size and MACs
can be predicted without building it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings, SpaceSettings, TrainingSettings
from autocompress.errors import one_line
from autocompress.intake import Task
from autocompress.intake.metric import Metric
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.transform import quantize
from autocompress.transform.student import build_student

SENSITIVITY_ATTR = "sensitivity"
SENSITIVITY_FORMAT = 1
# Ratios each group is scored at (snapped to the search's prune grid, capped by prune_max).
PRUNE_GRID = (0.2, 0.4, 0.6)
SCORE_BATCH = 128
# The pass's time: a tenth of a time-limited run, else at most five minutes (past that the
# largest groups are scored and the rest left out; see measure_sensitivity).
TIME_SHARE = 0.10
TIME_CAP_S = 300.0
CALIBRATION_BATCHES = 4  # of the search's calibration batches, for the activation observers
# Layers are all scored (a layer left out would stay float in every guided plan), so when the
# first choice shows they would take more than this share of the pass, every choice is
# scored on fewer images instead: on MiniLM (41 layers x 2 widths, 512 sequences) the layers
# alone took 766 s of a pass bounded at 72 s.
LAYER_SHARE = 0.6
MIN_IMAGES = 64


@dataclass
class Sensitivity:
    """The table: ``layers[name]`` and ``groups[name]`` hold the measured options."""

    images: int
    seconds: float
    teacher_accuracy: float
    # layer -> {"params": weight elements, "macs": MACs, "bits": {"8": {"kl", "accuracy",
    # "activation_bits"}, ...}}
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # group -> {"ratios": {"0.2": {"kl", "accuracy", "kept": {layer: weight share kept}}}}
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    # choices that could not be scored ("layer@int4", "group@40%") -> why; left out of plans
    failed: dict[str, str] = field(default_factory=dict)
    # prunable groups left unscored when the pass ran out of its time (smallest first);
    # guided plans do not prune them (the search still may)
    unscored: list[str] = field(default_factory=list)
    calibration_batches: int = CALIBRATION_BATCHES  # batches each quantized choice saw

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SENSITIVITY_FORMAT,
            "metric": "kl_to_teacher",
            "images": self.images,
            "seconds": round(self.seconds, 2),
            "teacher_accuracy": self.teacher_accuracy,
            "layers": self.layers,
            "groups": self.groups,
            "failed": self.failed,
            "unscored": self.unscored,
            "calibration_batches": self.calibration_batches,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(
            images=int(data["images"]),
            seconds=float(data["seconds"]),
            teacher_accuracy=float(data["teacher_accuracy"]),
            layers=dict(data.get("layers", {})),
            groups=dict(data.get("groups", {})),
            failed=dict(data.get("failed", {})),
            unscored=list(data.get("unscored", [])),
            calibration_batches=int(data.get("calibration_batches", CALIBRATION_BATCHES)),
        )

    def ranked_layers(self, bits: int) -> list[tuple[str, float]]:
        """(layer, KL at ``bits``), most sensitive first."""
        rows = [(name, float(entry["bits"][str(bits)]["kl"]))
                for name, entry in self.layers.items() if str(bits) in entry["bits"]]
        return sorted(rows, key=lambda row: -row[1])

    def fragile_layers(self, bits: int, factor: float = 5.0) -> list[str]:
        """Layers whose damage at ``bits`` is more than ``factor`` x the median layer's: the
        ones to keep at higher precision."""
        ranked = self.ranked_layers(bits)
        if len(ranked) < 3:
            return []
        median = sorted(kl for _, kl in ranked)[len(ranked) // 2]
        floor = max(median * factor, 1e-4)
        return [name for name, kl in ranked if kl > floor]


def pass_seconds(time_limit: float | None) -> float:
    """The time the sensitivity pass may take in a search with this time limit (minutes)."""
    if time_limit is not None:
        return TIME_SHARE * 60.0 * time_limit
    return TIME_CAP_S


def prune_grid(settings: SpaceSettings) -> list[float]:
    """The ratios a group is scored at: PRUNE_GRID on the search's step grid, within
    prune_max (an empty list when the search does not prune)."""
    high = space.prune_high(settings)
    if high <= 0:
        return []
    ratios = {round(round(r / settings.prune_step) * settings.prune_step, 6) for r in PRUNE_GRID}
    if high < min(PRUNE_GRID):  # a small prune_max: score its one ratio
        ratios.add(high)
    return sorted(r for r in ratios if 0 < r <= high)


@dataclass
class _Pass:
    """What scoring one choice needs: the BN-folded student, the fixed validation slice with
    the teacher's outputs on it, the observers' calibration, and the progress count."""

    task: Task
    base: nn.Module
    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    teacher_logits: list[torch.Tensor]
    calibration: list[torch.Tensor]
    weights: dict[str, int]  # weight elements per module of the teacher
    tick: Callable[[], None]


def measure_sensitivity(
    task: Task,
    inventory: Inventory,
    settings: SpaceSettings | SearchConfig,
    calibration: list[torch.Tensor],
    *,
    training: TrainingSettings | None = None,
    images: int = 512,
    on_item: Callable[[int, int], None] | None = None,
    seconds: float | None = None,
) -> Sensitivity:
    """Score every single choice of the search space against the teacher (no fine-tune).

    ``settings``: the search space, with ``training`` (how pruned copies are built); a
    ``SearchConfig`` gives both. ``seconds`` bounds the pass: every layer is scored (a layer
    left out of the table would stay float in every guided plan), then the prunable groups,
    largest first, while the time left covers one more group at the pace so far; the rest
    are listed as ``unscored`` (each group costs a pruned copy of the model per ratio: on
    densenet121 the groups alone ran past 20 minutes on 2 cores)."""
    if isinstance(settings, SearchConfig):
        both = SearchSettings.from_config(settings)
        settings, training = both.space, both.training
    if training is None:
        raise TypeError("measure_sensitivity needs training= settings with space settings")
    started = time.perf_counter()
    base = build_student(task, CompressionPlan(), training.round_to)  # BN folded, nothing else
    layers = [layer for layer in inventory.layers if layer.quantizable]
    widths = sorted((b for b in set(settings.bits) if b < 32), reverse=True)
    calibration_batches = CALIBRATION_BATCHES
    if seconds is not None and layers and widths:
        images, calibration_batches = _affordable_images(
            task, base, layers[0].name, widths[0], settings, calibration, images,
            LAYER_SHARE * seconds / (len(layers) * len(widths)))
    xs, ys = _fixed_slice(task, images)
    teacher = task.model.eval()
    with torch.no_grad():
        teacher_logits = [teacher(x) for x in xs]
    weights = {name: _weight_numel(module) for name, module in task.model.named_modules()}
    prunable = [g for g in inventory.groups if g.prunable] if space.prune_high(settings) else []
    # scored largest first (they matter most when time runs out), listed in graph order
    groups = [g.name for g in sorted(prunable, key=lambda g: -_group_weights(g, weights))]
    ratios = prune_grid(settings)
    total = len(layers) * len(widths) + len(groups) * len(ratios)
    done = itertools.count(1)
    scoring = _Pass(task, base, xs, ys, teacher_logits, calibration, weights,
                    lambda: _tick(on_item, next(done), total))
    # what each choice's observers really see: the search may hold fewer batches than asked
    table = Sensitivity(images=sum(int(y.numel()) for y in ys), seconds=0.0,
                        teacher_accuracy=_figure(teacher_logits, ys, task.metric),
                        calibration_batches=min(calibration_batches, len(calibration)))
    _score_layers(scoring, table, layers, widths, settings)
    _score_groups(scoring, table, groups, ratios, training,
                  None if seconds is None else started + seconds)
    table.groups = {g.name: table.groups[g.name] for g in prunable if g.name in table.groups}
    table.seconds = time.perf_counter() - started
    return table


def _score_layers(scoring: _Pass, table: Sensitivity, layers: list[Any], widths: list[int],
                  settings: SpaceSettings) -> None:
    """Each quantizable layer alone at each width below 32 bits, into ``table.layers``."""
    for layer in layers:
        entry: dict[str, Any] = {"params": scoring.weights.get(layer.name, 0),
                                 "macs": layer.flops, "bits": {}}
        for bits in widths:
            acts = space.activations_for(bits, settings)
            plan = CompressionPlan(bits={layer.name: bits}, activation_bits=acts)
            try:
                model = quantize.prepare_qat(scoring.base, plan)
                quantize.calibrate(model, scoring.calibration,
                                   max_batches=table.calibration_batches)
                kl, acc = _score(model, scoring.xs, scoring.ys, scoring.teacher_logits,
                                 scoring.task.metric)
            except Exception as exc:  # one choice that cannot be scored must not end the pass
                table.failed[f"{layer.name}@int{bits}"] = one_line(exc, typed=True)
            else:
                entry["bits"][str(bits)] = {"kl": kl, "accuracy": acc, "activation_bits": acts}
            scoring.tick()
        table.layers[layer.name] = entry


def _score_groups(scoring: _Pass, table: Sensitivity, groups: list[str], ratios: list[float],
                  training: TrainingSettings, deadline: float | None) -> None:
    """Each prunable group alone at each ratio, into ``table.groups``, while the time to
    ``deadline`` (perf_counter seconds) covers one more group at the pace so far; the groups
    left over are listed in ``table.unscored``."""
    task = scoring.task
    groups_started = time.perf_counter()
    for index, group in enumerate(groups):
        if deadline is not None and index > 0:
            pace = (time.perf_counter() - groups_started) / index
            if time.perf_counter() + pace > deadline:
                table.unscored = groups[index:]
                break
        measured: dict[str, Any] = {}
        for ratio in ratios:
            plan = CompressionPlan(prune={group: ratio})
            bn = (x for x, _ in task.data.batches("train", training.batch_size, shuffle=True,
                                                  seed=training.seed))
            try:
                model = build_student(task, plan, training.round_to, bn_batches=bn)
                kl, acc = _score(model, scoring.xs, scoring.ys, scoring.teacher_logits,
                                 task.metric)
            except Exception as exc:
                table.failed[f"{group}@{ratio:.0%}"] = one_line(exc, typed=True)
            else:
                measured[_ratio_key(ratio)] = {"kl": kl, "accuracy": acc,
                                               "kept": _kept_shares(model, scoring.weights)}
            scoring.tick()
        if measured:
            table.groups[group] = {"ratios": measured}


def _affordable_images(task: Task, base: nn.Module, layer: str, bits: int,
                       settings: SpaceSettings, calibration: list[torch.Tensor], images: int,
                       per_choice_s: float) -> tuple[int, int]:
    """How many images one choice may be scored on, and on how many calibration batches its
    observers are set, to take about ``per_choice_s``: one choice timed on a short slice,
    its per-image cost scaled; between MIN_IMAGES and ``images``. The copy and calibration
    are fixed per choice: when they and the MIN_IMAGES every choice is scored on overrun,
    the observers see one batch instead of CALIBRATION_BATCHES (on MiniLM they were most of
    a choice's time, and the pass ran 258 s against its 72 s)."""
    probe = min(images, MIN_IMAGES)
    xs, _ = _fixed_slice(task, probe)
    plan = CompressionPlan(bits={layer: bits},
                           activation_bits=space.activations_for(bits, settings))
    t0 = time.perf_counter()
    try:
        model = quantize.prepare_qat(base, plan)
        copied = time.perf_counter()
        quantize.calibrate(model, calibration, max_batches=CALIBRATION_BATCHES)
        t1 = time.perf_counter()
        with torch.no_grad():
            for x in xs:
                model(x)
    except Exception:  # the pass records why this choice fails; time it on the full slice
        return images, CALIBRATION_BATCHES
    per_image = (time.perf_counter() - t1) / max(probe, 1)
    batches = CALIBRATION_BATCHES
    fixed = t1 - t0
    if fixed + per_image * probe > per_choice_s and len(calibration) > 1:
        batches = 1
        fixed = (copied - t0) + (t1 - copied) / min(len(calibration), CALIBRATION_BATCHES)
    room = per_choice_s - fixed
    if per_image <= 0 or room >= per_image * images:
        return images, batches
    return max(min(MIN_IMAGES, images), min(images, int(room / per_image))), batches


def _group_weights(group: Any, weights: dict[str, int]) -> int:
    return sum(weights.get(member, 0) for member in group.members)


def _ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def _tick(on_item: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if on_item is not None:
        on_item(done, total)


def _fixed_slice(task: Task, images: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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


def _score(
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
    return (damage if math.isfinite(damage) else 1e3), _figure(outputs, ys, metric)


def _figure(outputs: list[torch.Tensor], ys: list[torch.Tensor], metric: Metric) -> float:
    """The task's figure on the slice (recorded as ``accuracy`` for people to read)."""
    return metric.score_batches((out.numpy(), y.numpy()) for out, y in zip(outputs, ys,
                                                                         strict=True))


def _weight_numel(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


def _kept_shares(model: nn.Module, teacher_weights: dict[str, int]) -> dict[str, float]:
    """Share of each layer's weight elements a pruned model kept (only the layers that lost
    some): channel pruning shrinks both the group's layers and their consumers. BatchNorms,
    folded away in the student, are not layers of the file."""
    kept: dict[str, float] = {}
    for name, module in model.named_modules():
        before = teacher_weights.get(name, 0)
        after = _weight_numel(module)
        if before and 0 < after < before:
            kept[name] = round(after / before, 6)
    return kept


__all__ = [
    "SENSITIVITY_ATTR",
    "Sensitivity",
    "measure_sensitivity",
    "prune_grid",
]
