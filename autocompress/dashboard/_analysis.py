"""Pure functions that turn stored trials into what the pages show.

Nothing here touches storage, Flask or torch: inputs are plain dicts built from Optuna's
``FrozenTrial`` objects by ``_storage``, so every rule (feasibility, front, hypervolume,
plan layout, baseline comparison) is testable with literals.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from autocompress.results import metrics
from autocompress.results.pareto import hypervolume_points
from autocompress.study.records import feasibility, finite_number

# The order objectives are written in by the search (BRIEF: accuracy, size, then latency).
DEFAULT_METRICS: tuple[str, ...] = ("accuracy", "size_bytes", "latency_ms")
_METRIC_ALIASES = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "size": "size_bytes",
    "size_bytes": "size_bytes",
    "zip_size_bytes": "zip_size_bytes",
    "latency": "latency_ms",
    "latency_ms": "latency_ms",
}
_TIMING_ORDER = ("build", "precheck", "finetune", "export", "measure")
# Leaf modules that carry the weights a plan acts on. The inventory lists every named module
# (containers, norms, activations too), so the chart keeps only these, plus quantizable
# layers, prune-group members and anything the plan names.
_WEIGHT_TYPES = frozenset(
    {
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Linear",
        "LazyLinear",
        "LazyConv1d",
        "LazyConv2d",
        "LazyConv3d",
    }
)


def maybe_json(value: Any) -> Any:
    """Attributes holding dicts/lists are stored as JSON strings; decode those, keep others."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


number_or_none = finite_number  # one definition, in pareto


def metric_key(name: str | None, index: int) -> str:
    """Map a study metric name (or its position) to the trial attribute that holds it."""
    if name is not None and name.lower() in _METRIC_ALIASES:
        return _METRIC_ALIASES[name.lower()]
    return DEFAULT_METRICS[index] if index < len(DEFAULT_METRICS) else f"objective_{index}"


is_feasible = feasibility  # one definition, in pareto (the search reads it too)


def is_compressed_candidate(trial: dict[str, Any]) -> bool:
    """Feasible search result or compressed baseline; the fp32 model is the reference only.

    Counting the uncompressed fp32 baseline as "best accuracy" would make every study's best
    the unchanged teacher and flatten the progress curve from trial 0.
    """
    return bool(trial["feasible"]) and trial.get("baseline") != "fp32"


def progress(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Best feasible accuracy and 2-D hypervolume after each trial number.

    Candidates are feasible trials other than the fp32 reference. The reference size is
    fixed for the whole study (1.1 x the largest size any complete trial reached, fp32
    included) so the curve is monotone and comparable across the run.
    """
    sizes = [t["size_bytes"] for t in trials if t["state"] == "COMPLETE" and t["size_bytes"]]
    ref_size = max(sizes) * 1.1 if sizes else None
    numbers: list[int] = []
    best_acc: list[float | None] = []
    hv: list[float | None] = []
    front: list[tuple[float, float]] = []  # only non-dominated points change the volume
    volume = 0.0
    best: float | None = None
    for t in sorted(trials, key=lambda t: t["number"]):
        usable = t["accuracy"] is not None and t["size_bytes"] is not None
        if usable and is_compressed_candidate(t):
            point = (t["accuracy"], t["size_bytes"])
            best = point[0] if best is None else max(best, point[0])
            if not any(a >= point[0] and s <= point[1] for a, s in front):
                front = [(a, s) for a, s in front if not (point[0] >= a and point[1] <= s)]
                front.append(point)
                volume = hypervolume_points(front, ref_size) if ref_size is not None else 0.0
        numbers.append(t["number"])
        best_acc.append(best)
        hv.append(volume if ref_size is not None else None)
    return {
        "trial_numbers": numbers,
        "best_feasible_accuracy": best_acc,
        "hypervolume": hv,
        "reference": {"accuracy": 0.0, "size_bytes": ref_size},
    }


def plan_layers(
    plan: dict[str, Any] | None, inventory: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Per-layer bits / prune ratio / sparsity in model order.

    Model order is the inventory's layer list; a group's prune ratio applies to every member
    layer of that group. Only weight layers are listed (Conv/Linear types, quantizable
    layers, prune-group members, layers the plan names), so containers, norms and
    activations do not pad the chart.
    """
    plan = plan or {}
    bits = {str(k): v for k, v in (plan.get("bits") or {}).items()}
    prune = {str(k): v for k, v in (plan.get("prune") or {}).items()}
    sparsity = {str(k): v for k, v in (plan.get("sparsity") or {}).items()}
    layers = list((inventory or {}).get("layers") or [])
    groups = list((inventory or {}).get("groups") or [])

    group_of: dict[str, str] = {}
    ratio_of: dict[str, float] = {}
    for g in groups:
        name = str(g.get("name"))
        for member in g.get("members") or []:
            group_of.setdefault(str(member), name)
            if name in prune:
                ratio_of[str(member)] = float(prune[name])
    for name, ratio in prune.items():  # a ratio keyed by a layer with no known group
        ratio_of.setdefault(name, float(ratio))

    rows: list[dict[str, Any]] = []
    named = set(bits) | set(sparsity) | set(prune)
    for layer in layers:
        name = str(layer.get("name"))
        kind = str(layer.get("type", ""))
        weight_layer = bool(layer.get("quantizable")) or kind in _WEIGHT_TYPES
        if not (weight_layer or name in named or name in group_of):
            continue
        rows.append(_layer_row(name, kind, layer, bits, ratio_of, sparsity, group_of))
    if not layers:  # no inventory stored: fall back to the plan's own key order
        order = list(dict.fromkeys([*bits, *prune, *sparsity]))
        rows = [_layer_row(n, "", {}, bits, ratio_of, sparsity, group_of) for n in order]
    return rows


def _layer_row(
    name: str,
    kind: str,
    layer: dict[str, Any],
    bits: dict[str, Any],
    ratio_of: dict[str, float],
    sparsity: dict[str, Any],
    group_of: dict[str, str],
) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "bits": int(bits.get(name, 32)),
        "prune": float(ratio_of.get(name, 0.0)),
        "sparsity": float(sparsity.get(name, 0.0)),
        "group": group_of.get(name),
        "quantizable": layer.get("quantizable"),
        "excluded_reason": layer.get("excluded_reason"),
        "params": layer.get("params"),
    }


def timing_rows(timing: Any) -> list[dict[str, Any]]:
    """Seconds per phase in pipeline order (unknown phases after the known ones)."""
    timing = maybe_json(timing)
    if not isinstance(timing, dict):
        return []
    known = [k for k in _TIMING_ORDER if k in timing]
    rest = [k for k in timing if k not in _TIMING_ORDER]
    rows = []
    for k in known + rest:
        seconds = number_or_none(timing[k])
        if seconds is not None:
            rows.append({"phase": k, "seconds": seconds})
    return rows


def compare_to_fp32(trial: dict[str, Any], fp32: dict[str, Any] | None) -> dict[str, Any]:
    """Times smaller, times faster, accuracy change (points) and the guide's rates
    (accuracy drop, FLOP and BOP reduction; ``metrics.versus_fp32``) against the fp32
    baseline.

    Speed prefers the interleaved ratio measured beside the fp32 file in the same run
    (``latency_vs_fp32``: latency drifts, interleaving cancels it), then the fp32 latency
    recorded on the trial, then the fp32 baseline trial's own latency.
    """
    ratio = number_or_none(trial.get("latency_vs_fp32"))
    out: dict[str, Any] = metrics.versus_fp32(
        accuracy=number_or_none(trial.get("accuracy")),
        size_bytes=number_or_none(trial.get("size_bytes")),
        flops=number_or_none(trial.get("flops")),
        bops=number_or_none(trial.get("bops")),
        latency_vs_fp32=ratio if ratio and ratio > 0 else None,
        fp32=fp32,
    )
    out["latency_basis"] = None
    out["fp32_trial"] = fp32["number"] if fp32 else None
    lat = trial.get("latency_ms")
    fp32_lat = number_or_none(trial.get("fp32_latency_ms"))
    if out["times_faster"] is not None:
        out["latency_basis"] = "interleaved with the fp32 file in the same run"
    elif fp32_lat and lat:
        out["times_faster"] = fp32_lat / lat
        out["latency_basis"] = "fp32 latency recorded with this trial"
    elif fp32 and fp32.get("latency_ms") and lat:
        out["times_faster"] = fp32["latency_ms"] / lat
        out["latency_basis"] = f"fp32 baseline trial #{fp32['number']}"
    return out


def compact_ranges(numbers: Iterable[int]) -> str:
    """``[0,1,2,5,7,8]`` -> ``"0-2, 5, 7-8"`` for error messages listing trial numbers."""
    nums = sorted(set(numbers))
    if not nums:
        return "none"
    parts = []
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
