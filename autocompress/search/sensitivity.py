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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings, SpaceSettings, TrainingSettings
from autocompress.errors import one_line
from autocompress.intake import Task
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.search.choice_score import figure as _figure
from autocompress.search.choice_score import fixed_slice as _fixed_slice
from autocompress.search.choice_score import kept_shares as _kept_shares
from autocompress.search.choice_score import score_choice as _score
from autocompress.search.choice_score import weight_numel as _weight_numel
from autocompress.search.group_estimates import estimate_groups, ratio_key
from autocompress.transform import quantize
from autocompress.transform.student import build_student

SENSITIVITY_ATTR = "sensitivity"
SENSITIVITY_FORMAT = 1
# Ratios each group is scored at (snapped to the search's prune grid, capped by prune_max).
PRUNE_GRID = (0.2, 0.4, 0.6)
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
    # layers with a width left unscored when the pass ran out of its time: their entry there
    # is the median of the scored layers' ("estimated": true), so guided plans still use them
    estimated: list[str] = field(default_factory=list)
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
            "estimated": self.estimated,
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
            estimated=list(data.get("estimated", [])),
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
    clock: _Clock


@dataclass
class _Clock:
    """The pass's time bound: would the next choice, at the pace of the choices timed since
    ``since``, end past ``deadline`` (perf_counter seconds; None: unbounded)?"""

    deadline: float | None
    since: float = field(default_factory=time.perf_counter)
    items: int = 0
    prior: float = 0.0  # the pace before the last restart: a first guess for the next kind

    def pace(self) -> float:
        return (time.perf_counter() - self.since) / self.items if self.items else self.prior

    def restart(self) -> None:
        self.prior = self.pace()
        self.since, self.items = time.perf_counter(), 0

    def spent(self) -> bool:
        return self.deadline is not None and time.perf_counter() + self.pace() > self.deadline


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
    ``SearchConfig`` gives both. ``seconds`` bounds the pass: each choice is scored while the
    time left covers one more at the pace so far (a ResNet-20 pass took 277 s of its 90 s
    when only whole groups were checked). The layers come first, within LAYER_SHARE when
    groups follow; a layer width left over gets the scored layers' median (``estimated``).
    Then the groups, largest first; the rest are ``unscored``, priced by the scored groups'
    median (``group_estimates``; on densenet121 the groups alone ran past 20 minutes)."""
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
    groups = [g.name for g in sorted(prunable, key=lambda g: -_group_weights(g, weights))]
    ratios = prune_grid(settings)  # groups scored largest first, listed in graph order
    total = len(layers) * len(widths) + len(groups) * len(ratios)
    done = itertools.count(1)
    end = None if seconds is None else started + seconds
    # layers stop at their share when groups follow (they took a whole pass, leaving 11 of
    # ResNet-20's 12 groups unscored: nothing could prune them under a latency budget)
    scoring = _Pass(task, base, xs, ys, teacher_logits, calibration, weights,
                    lambda: _tick(on_item, next(done), total),
                    _Clock(end if end is None or not groups else started + LAYER_SHARE * seconds))
    # what each choice's observers really see: the search may hold fewer batches than asked
    table = Sensitivity(images=sum(int(y.numel()) for y in ys), seconds=0.0,
                        teacher_accuracy=_figure(teacher_logits, ys, task.metric),
                        calibration_batches=min(calibration_batches, len(calibration)))
    _score_layers(scoring, table, layers, widths, settings)
    _score_groups(scoring, table, groups, ratios, training, end)
    estimate_groups(table, [g for g in prunable if g.name in table.unscored], ratios)
    table.groups = {g.name: table.groups[g.name] for g in prunable if g.name in table.groups}
    table.seconds = time.perf_counter() - started
    return table


def _score_layers(scoring: _Pass, table: Sensitivity, layers: list[Any], widths: list[int],
                  settings: SpaceSettings) -> None:
    """Each quantizable layer alone at each width below 32 bits, into ``table.layers``, while
    the pass's time lasts (once a layer is scored at that width); the rest are estimated."""
    for layer in layers:
        entry: dict[str, Any] = {"params": scoring.weights.get(layer.name, 0),
                                 "macs": layer.flops, "bits": {}}
        for bits in widths:
            if scoring.clock.spent() and any(str(bits) in e["bits"]
                                             for e in table.layers.values()):
                if layer.name not in table.estimated:
                    table.estimated.append(layer.name)
                continue
            scoring.clock.items += 1
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
    _estimate(table, widths, settings)


def _estimate(table: Sensitivity, widths: list[int], settings: SpaceSettings) -> None:
    """Fill the widths of ``table.estimated`` layers with the scored layers' median."""
    for bits in widths:
        scored = [e["bits"][str(bits)] for name, e in table.layers.items()
                  if str(bits) in e["bits"] and name not in table.estimated]
        if not scored:
            continue
        middle = len(scored) // 2
        for name in table.estimated:
            table.layers[name]["bits"].setdefault(str(bits), {
                "kl": sorted(e["kl"] for e in scored)[middle],
                "accuracy": sorted(e["accuracy"] for e in scored)[middle],
                "activation_bits": space.activations_for(bits, settings), "estimated": True})


def _score_groups(scoring: _Pass, table: Sensitivity, groups: list[str], ratios: list[float],
                  training: TrainingSettings, deadline: float | None) -> None:
    """Each prunable group alone at each ratio, into ``table.groups``, while the pass's time
    covers one more ratio at the groups' pace so far; the groups not started are listed in
    ``table.unscored`` (one cut short keeps the ratios it scored)."""
    task = scoring.task
    scoring.clock.restart()
    scoring.clock.deadline = deadline  # the pass's own: the layers stopped at their share
    for index, group in enumerate(groups):
        measured: dict[str, Any] = {}
        tried = 0
        for ratio in ratios:
            if scoring.clock.spent():
                break
            scoring.clock.items += 1
            tried += 1
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
                measured[ratio_key(ratio)] = {"kl": kl, "accuracy": acc,
                                               "kept": _kept_shares(model, scoring.weights)}
            scoring.tick()
        if measured:
            table.groups[group] = {"ratios": measured}
        if scoring.clock.spent():
            table.unscored = groups[index + (1 if tried else 0):]
            break


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


def _tick(on_item: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if on_item is not None:
        on_item(done, total)


__all__ = [
    "SENSITIVITY_ATTR",
    "Sensitivity",
    "measure_sensitivity",
    "prune_grid",
]
