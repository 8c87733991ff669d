"""Pure functions that turn stored attributes into what the pages show: decoded JSON
attributes, metric keys, the per-layer plan chart, phase timings, trial-number ranges.

Nothing here touches storage, Flask or torch: inputs are plain dicts built from Optuna's
``FrozenTrial`` objects by ``_summary``, so each rule is testable with literals. Fronts,
hypervolume and the comparison with fp32 are ``autocompress.results``' (the one rule
``show`` and export use too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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


number_or_none = finite_number  # one definition, in study.records


def metric_key(name: str | None, index: int) -> str:
    """Map a study metric name (or its position) to the trial attribute that holds it."""
    if name is not None and name.lower() in _METRIC_ALIASES:
        return _METRIC_ALIASES[name.lower()]
    return DEFAULT_METRICS[index] if index < len(DEFAULT_METRICS) else f"objective_{index}"


is_feasible = feasibility  # one definition, in study.records (the search reads it too)


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
