"""The study's measured trials as the proposer sees them (plain data), the order moves are
derived from them in, what makes two plans the same candidate, and the hypervolume a
candidate adds to the front."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autocompress.model.groups import kept_channels
from autocompress.model.plan import CompressionPlan
from autocompress.results.pareto import nondominated
from autocompress.search.surrogate import front_accuracy_at
from autocompress.study import attrs as trial_attrs
from autocompress.trial.lineage import nearest_parent


@dataclass(frozen=True)
class Measured:
    """What proposals need of a measured trial (plain data)."""

    number: int
    plan: CompressionPlan
    accuracy: float
    size: float
    trained: bool  # fine-tuned by this process and held for inheritance
    inherited_from: int | None = None
    default_steps: bool = True  # fine-tuned for the study's step count (calibration pairs)
    latency_ratio: float | None = None  # measured, interleaved with fp32


def front_order(trials: Sequence[Measured]) -> list[Measured]:
    """The front's trials first (most accurate first), then the others by how far below the
    front they are at their size: moves start from the front and, when it has few members,
    from the trials nearest to it."""
    points = [(t.size, t.accuracy) for t in trials]

    def gap(t: Measured) -> float:
        reached = front_accuracy_at(t.size, points)
        return 0.0 if reached is None else max(0.0, reached - t.accuracy)

    return sorted(trials, key=lambda t: (gap(t), -t.accuracy, t.size))


def on_front(trials: Sequence[Measured]) -> list[Measured]:
    by_number = {t.number: t for t in trials}
    return [by_number[n] for n in nondominated(
        {t.number: (t.accuracy, -t.size) for t in trials}, [True, True])]


def structure_key(plan: CompressionPlan) -> str:
    """What makes two plans the same candidate for the proposer: widths, ratios, activations,
    realisation, a non-default activation scheme (the distillation settings and step count
    do not)."""
    bits = sorted((k, v) for k, v in plan.bits.items() if v < 32)
    prune = sorted((k, round(v, 4)) for k, v in plan.prune.items() if v > 0)
    key = f"{bits}|{prune}|{plan.activation_bits}|{plan.realisation}|{plan.global_sparsity}"
    # appended only when not the default, so keys made before schemes existed are unchanged
    scheme = plan.activation_scheme
    return key if scheme == CompressionPlan().activation_scheme else f"{key}|{scheme}"


def realised_key(plan: CompressionPlan, channels: Mapping[str, int], round_to: int) -> str:
    """What the plan builds: ``structure_key`` with each pruned group's ratio replaced by the
    channels it keeps (``channels``: each group's count unpruned). Ratios a grid step apart
    round (``round_to``) to one channel count (64 channels at 0.08 and at 0.12 both keep 56);
    the 40-minute ResNet-20 search fine-tuned two plans that differed only so (ratios ~0.10
    and ~0.12 on two groups: the same file size, the same accuracy). A group not in
    ``channels`` keeps its ratio."""
    kept = {}
    for name, ratio in plan.prune.items():
        if name not in channels:
            kept[name] = f"r{round(ratio, 4)}"
        elif (count := kept_channels(channels[name], ratio, round_to=round_to)) < channels[name]:
            kept[name] = str(count)
    bare = structure_key(dataclasses.replace(plan, prune={}))
    return f"{bare}|kept{sorted(kept.items())}"


# hypervolume counts accuracy down to fp32 minus this: a plan far down after the short
# fine-tune is no dead end (ResNet-20 at 12.5x: -3.55 test points, -0.30 after a 7-epoch
# refine; at 13.2x -4.8, -1.3 after 4 epochs). At 0.05 the proposer saw nothing past ~10x
# and spent 40 minutes around the 8x knee; at 0.10 nothing past 15.6x in 40 minutes (every
# smaller plan was predicted under the floor after 150 steps: the 16x rung never ran)
FLOOR_DROP = 0.20
LOSSLESS = 0.01  # accuracy within this of fp32 counts as free compression (smallest_counted)


def hypervolume_floor(trials: Sequence[Measured], fp32_accuracy: float, *,
                      budgeted: bool) -> float:
    """Accuracy the hypervolume counts from: FLOOR_DROP under fp32, or under the best
    trial inside the budgets when a tight budget keeps every one of them lower (else
    every move there would add nothing and TPE would take over)."""
    floor = fp32_accuracy - FLOOR_DROP
    if trials and budgeted:
        floor = min(floor, max(t.accuracy for t in trials) - FLOOR_DROP)
    return floor


def smallest_counted(trials: Sequence[Measured], targets: Sequence[float], *,
                     fp32_bytes: float, fp32_accuracy: float, extent: float) -> float:
    """The size (bytes) under which hypervolume_gain stops counting a smaller file: ``extent``
    times past the largest of the ``targets`` (ratios smaller than fp32) and of the smallest
    trial within LOSSLESS of fp32 accuracy. While compressing is still free (the digits demo
    is lossless at 30x) the range widens with the front; where it is not, it stays there."""
    free = [fp32_bytes / t.size for t in trials
            if t.size > 0 and t.accuracy >= fp32_accuracy - LOSSLESS]
    return fp32_bytes / (max([*targets, *free], default=1.0) * extent)


def hypervolume_gain(points: Sequence[tuple[float, float]], new: tuple[float, float], *,
                     fp32_bytes: float, floor: float, ceiling: float = math.inf,
                     smallest: float = 0.0) -> float:
    """Area a (size, accuracy) point adds to the front's, in log size x accuracy between
    ``floor`` and ``ceiling`` (both larger-is-better after the log). Accuracy above the
    ceiling (the teacher's) counts as the ceiling: a candidate a validation split scores a
    few images above the teacher is not better than the teacher, and rewarding it sent the
    proposer after that noise at 3-4x instead of towards smaller files. A size under
    ``smallest`` bytes counts as ``smallest``: past it a smaller file adds no area, only a
    more accurate one does."""
    def volume(pts: Sequence[tuple[float, float]]) -> float:
        xy = sorted(((math.log(fp32_bytes / max(s, smallest)), min(a, ceiling) - floor)
                     for s, a in pts
                     if s > 0 and s < fp32_bytes and a > floor), reverse=True)
        area, best_y = 0.0, 0.0
        for i, (x, y) in enumerate(xy):
            best_y = max(best_y, y)
            next_x = xy[i + 1][0] if i + 1 < len(xy) else 0.0
            area += (x - next_x) * best_y
        return area

    return volume([*points, new]) - volume(points)


def measured_trials(records: Sequence[Any], held: Callable[[int], bool],
                    default_steps: int, *, feasible: bool = True) -> list[Measured]:
    """The study's measured trials inside the budgets (``feasible=False``: outside them) as
    ``Measured`` (``held``: whether this process holds a trial's trained weights)."""
    out = []
    for r in records:
        if not r.measured or bool(r.feasible) != feasible or r.accuracy is None or not r.plan:
            continue
        size = r.objective_size
        if size is None:
            continue
        plan = CompressionPlan.from_dict(r.plan)
        inherited = r.attrs.get(trial_attrs.INHERITED_FROM)
        ratio = r.attrs.get(trial_attrs.LATENCY_VS_FP32)
        out.append(Measured(r.number, plan, float(r.accuracy), float(size), held(r.number),
                            None if inherited is None else int(inherited),
                            plan.finetune_steps == default_steps and r.baseline is None,
                            None if ratio is None else float(ratio)))
    return out


def fine_tune_start(plan: CompressionPlan, preferred: int, trials: Sequence[Measured],
                    floor: float) -> Measured | None:
    """The trial the plan's fine-tune will inherit from (``trial.lineage``'s rule, over the
    trials this process holds), or None: the teacher."""
    held = sorted((t for t in trials if t.trained), key=lambda t: t.number)
    number = nearest_parent(plan, [(t.number, t.plan, t.accuracy) for t in held],
                            preferred=preferred, floor=floor)
    return next((t for t in held if t.number == number), None)


__all__ = ["FLOOR_DROP", "Measured", "fine_tune_start", "front_order", "hypervolume_floor",
           "hypervolume_gain", "measured_trials", "on_front", "realised_key", "smallest_counted",
           "structure_key"]
