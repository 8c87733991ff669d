"""Pareto fronts, dominance, hypervolume and the selection rule: pure functions over plain
records (``TrialRecord``) and over the dashboard's plain rows (dicts), so the search, ``show``,
export and the dashboard share one front."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autocompress.config.budgets import Budget
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def fp32_record(records: Iterable[TrialRecord]) -> TrialRecord | None:
    """The study's measured fp32 baseline trial: what every "vs fp32" figure compares with."""
    return next((r for r in records if r.baseline == "fp32" and r.measured), None)


def dominates(a: TrialRecord, b: TrialRecord, objectives: Sequence[str]) -> bool:
    better_or_equal = all(a.objective(o) >= b.objective(o) for o in objectives)
    strictly = any(a.objective(o) > b.objective(o) for o in objectives)
    return better_or_equal and strictly


def parent_of(record: TrialRecord) -> int | None:
    """The trial a retrain (promotion or refine) trained the same plan of, longer."""
    parent = record.attrs.get(trial_attrs.PARENT)
    return None if parent is None else int(parent)


def superseded(retrains: Iterable[tuple[int | None, bool]]) -> set[int]:
    """The trials a retrain of the same plan supersedes, from (parent trial, the retrain was
    measured within budget) pairs: each plan counts once, at its longest fine-tune, and a
    retrain that missed a budget on its own measurement leaves its parent in place. The one
    rule for the front here and on the dashboard (which works on plain rows)."""
    return {parent for parent, within in retrains if parent is not None and within}


def most_trained(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The records minus those a measured, feasible retrain of the same plan supersedes."""
    pool = list(records)
    gone = superseded((parent_of(r), r.measured and r.feasible) for r in pool)
    return [r for r in pool if r.number not in gone]


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    """True when a is at least as good as b everywhere and better somewhere (signs: +1 max)."""
    better = False
    for x, y, s in zip(a, b, signs, strict=True):
        if s * x < s * y:
            return False
        if s * x > s * y:
            better = True
    return better


def nondominated(points: dict[int, Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Numbers of the non-dominated points (ties all kept), in ascending number order.

    Points are visited best-first in lexicographic order, so a later point can never
    dominate an earlier one: each point is checked against the front only (O(n * front)),
    which keeps a 2-second poll cheap on studies with thousands of trials.
    """
    signs = [1 if m else -1 for m in maximize]
    order = sorted(points, key=lambda n: [-s * v for s, v in zip(signs, points[n], strict=True)])
    front: list[int] = []
    for n in order:
        if not any(_dominates(points[m], points[n], signs) for m in front):
            front.append(n)
    return sorted(front)


def is_compressed_candidate(row: Mapping[str, Any]) -> bool:
    """Feasible search result or compressed baseline; the fp32 model is the reference only.

    Counting the uncompressed fp32 baseline as "best accuracy" would make every study's best
    the unchanged teacher and flatten the progress curve from trial 0.
    """
    return bool(row["feasible"]) and row.get("baseline") != "fp32"


def fp32_row(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The fp32 baseline trial among plain rows: complete, with a measured accuracy."""
    return next((r for r in rows if r["baseline"] == "fp32" and r["state"] == "COMPLETE"
                 and r["accuracy"] is not None), None)


def row_fronts(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], maximize: Sequence[bool]
) -> tuple[set[int], list[int], list[int]]:
    """(superseded, front, front_2d) of plain rows: the trial numbers a feasible retrain of
    the same plan supersedes, the non-dominated feasible rows over ``keys`` (ascending
    number), and the feasible (accuracy up, size down) front, smallest first. Each plan
    counts once, at its most-trained trial (``superseded``)."""
    gone = superseded((r["parent_trial"], bool(r["feasible"])) for r in rows)
    feasible = [r for r in rows if r["feasible"] and r["number"] not in gone]
    full = {
        r["number"]: [r[k] for k in keys]
        for r in feasible
        if all(r[k] is not None for k in keys)
    }
    front = nondominated(full, maximize)
    flat = {
        r["number"]: [r["accuracy"], r["size_bytes"]]
        for r in feasible
        if r["accuracy"] is not None and r["size_bytes"] is not None
    }
    front_2d = nondominated(flat, [True, False])
    front_2d.sort(key=lambda n: flat[n][1])
    return gone, front, front_2d


def progress_curve(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Best feasible accuracy and 2-D hypervolume after each trial number, over plain rows.

    Candidates are feasible trials other than the fp32 reference. The reference size is
    fixed for the whole study (1.1 x the largest size any complete trial reached, fp32
    included) so the curve is monotone and comparable across the run; ``hypervolume_share``
    is the volume as a share of that reference box.
    """
    sizes = [r["size_bytes"] for r in rows if r["state"] == "COMPLETE" and r["size_bytes"]]
    ref_size = max(sizes) * 1.1 if sizes else None
    numbers: list[int] = []
    best_acc: list[float | None] = []
    hv: list[float | None] = []
    front: list[tuple[float, float]] = []  # only non-dominated points change the volume
    volume = 0.0
    best: float | None = None
    for r in sorted(rows, key=lambda r: r["number"]):
        usable = r["accuracy"] is not None and r["size_bytes"] is not None
        if usable and is_compressed_candidate(r):
            point = (r["accuracy"], r["size_bytes"])
            best = point[0] if best is None else max(best, point[0])
            if not any(a >= point[0] and s <= point[1] for a, s in front):
                front = [(a, s) for a, s in front if not (point[0] >= a and point[1] <= s)]
                front.append(point)
                volume = hypervolume_points(front, ref_size) if ref_size is not None else 0.0
        numbers.append(r["number"])
        best_acc.append(best)
        hv.append(volume if ref_size is not None else None)
    return {
        "trial_numbers": numbers,
        "best_feasible_accuracy": best_acc,
        "hypervolume": hv,
        "hypervolume_share": [v / ref_size if v is not None and ref_size else None
                              for v in hv],
        "reference": {"accuracy": 0.0, "size_bytes": ref_size},
    }


def hypervolume_points(points: Iterable[tuple[float, float]], ref_size: float) -> float:
    """Area dominated by (accuracy, size) points against the reference (accuracy 0, ref_size).

    Union of rectangles [size, ref_size] x [0, accuracy]: sweep sizes upwards and keep the
    best accuracy seen so far; dominated points then add nothing.
    """
    pts = sorted(
        (s, a) for a, s in points if a is not None and s is not None and s < ref_size and a > 0
    )
    area = 0.0
    best = 0.0
    for i, (size, acc) in enumerate(pts):
        best = max(best, acc)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref_size
        area += (nxt - size) * best
    return area


def pareto_front(
    records: Iterable[TrialRecord], objectives: Sequence[str] = ("accuracy", "size")
) -> list[TrialRecord]:
    """Feasible, measured, non-dominated records (the most-trained trial of each plan),
    sorted by size (smallest first)."""
    pool = {r.number: r for r in most_trained(records) if r.measured and r.feasible}
    # objective() is oriented larger-is-better for every objective
    points = {n: [r.objective(o) for o in objectives] for n, r in pool.items()}
    front = [pool[n] for n in nondominated(points, [True] * len(objectives))]
    return sorted(front, key=lambda r: (r.objective_size or 0.0, -(r.accuracy or 0.0)))


def hypervolume_2d(
    records: Iterable[TrialRecord], reference_size: float, reference_accuracy: float = 0.0
) -> float:
    """Area dominated by the (accuracy up, size down) front, bounded by the reference point.

    Units: accuracy fraction x bytes / reference_size, i.e. normalised to [0, 1]-ish so fronts
    of one benchmark can be compared against one fixed reference.
    """
    points = [(float(r.accuracy) - reference_accuracy, float(r.objective_size))
              for r in pareto_front(records)
              if r.objective_size is not None and r.accuracy is not None]
    return hypervolume_points(points, reference_size) / reference_size


def hypervolume_contributions(
    records: Sequence[TrialRecord], reference_size: float, reference_accuracy: float = 0.0
) -> dict[int, float]:
    """Each front member's exclusive share of the (accuracy, size) hypervolume: what the
    front loses without it (trial number -> area, normalised like ``hypervolume_2d``)."""
    front = pareto_front(records)
    whole = hypervolume_2d(front, reference_size, reference_accuracy)
    return {
        r.number: whole - hypervolume_2d([o for o in front if o.number != r.number],
                                         reference_size, reference_accuracy)
        for r in front
    }


def meets(record: TrialRecord, budgets: Sequence[Budget]) -> bool:
    latency = record.budget_latency_ms
    size = record.objective_size
    if latency is None or size is None:
        return False
    return all(b.violation(latency, size) <= 0 for b in budgets)


@dataclass(frozen=True)
class Selection:
    chosen: TrialRecord
    rule: str
    runners_up: list[TrialRecord]


def drop_floor(reference: float, drop: float) -> float:
    """The lowest figure within ``drop`` (a fraction) of ``reference``. abs(): a task's
    lower-is-better metric is recorded negated, so its reference is negative and a drop
    lowers it by the same share of its size."""
    return reference - abs(reference) * drop


def select_best(
    records: Iterable[TrialRecord],
    budgets: Sequence[Budget],
    *,
    max_accuracy_drop: float | None = None,
    reference_accuracy: float | None = None,
    metric: str = "accuracy",
) -> Selection | None:
    """Highest validation accuracy among measured trials within every budget (and the drop
    limit, as a fraction of the fp32 accuracy); ties go to the smaller file. ``metric``:
    the study's label for its accuracy objective (a task's own metric), named in the rule."""
    pool = [r for r in most_trained(records) if r.measured and r.feasible and meets(r, budgets)]
    rule = f"highest validation {metric} within " + (
        ", ".join(b.text for b in budgets) if budgets else "no budget"
    )
    if max_accuracy_drop is not None and reference_accuracy is not None:
        floor = drop_floor(reference_accuracy, max_accuracy_drop)
        pool = [r for r in pool if (r.accuracy or 0.0) >= floor - 1e-12]
        rule += f" and at most {max_accuracy_drop:.2%} {metric} drop vs fp32"
    if not pool:
        return None
    ranked = sorted(pool, key=lambda r: (-(r.accuracy or 0.0), r.objective_size or 0.0,
                                         r.number))
    return Selection(chosen=ranked[0], rule=rule + "; ties to the smaller file",
                     runners_up=ranked[1:4])


def closest_to_budgets(
    records: Iterable[TrialRecord], budgets: Sequence[Budget], k: int = 3
) -> list[tuple[TrialRecord, str]]:
    """The k measured trials that miss the budgets by the least, with what each misses by."""
    scored = []
    for r in records:
        latency = r.budget_latency_ms
        pre_checked = r.rejected is not None and not r.attrs.get(trial_attrs.REJECTED_BY_MODEL)
        size = r.objective_size
        if latency is None or size is None or not (r.state == "COMPLETE" or pre_checked):
            continue
        misses = [(b.violation(latency, size), b.describe(latency, size)) for b in budgets]
        worst = max((m for m, _ in misses), default=0.0)
        why = "; ".join(f"{text} (+{m:.0%})" for m, text in misses if m > 0) or "meets budgets"
        scored.append((worst, r, why))
    scored.sort(key=lambda item: (item[0], -(item[1].accuracy or 0.0)))
    return [(r, why) for _, r, why in scored[:k]]
