"""Sensitivity entries for the prunable groups a time-bounded pass had no time for, so
guided plans and proposals can still prune them (``sensitivity.measure_sensitivity``)."""

from __future__ import annotations

from typing import Any


def ratio_key(ratio: float) -> str:
    """A prune ratio as the sensitivity table's key ("0.4")."""
    return f"{ratio:g}"


def estimate_groups(table: Any, unscored: list[Any], ratios: list[float]) -> None:
    """Entries for the groups the pass had no time for: at each ratio, the scored groups'
    median KL (they are the larger ones, so rarely an underestimate) and each member's
    output channels cut by the ratio (the consumers' input channels are left out: sizes and
    latencies come out on the safe side). Marked ``estimated``; ``unscored`` still lists
    them."""
    for group in unscored:
        measured: dict[str, Any] = {}
        for ratio in ratios:
            key = ratio_key(ratio)
            scored = [e["ratios"][key] for e in table.groups.values()
                      if key in e["ratios"] and not e.get("estimated")]
            if scored:
                middle = len(scored) // 2
                measured[key] = {
                    "kl": sorted(float(e["kl"]) for e in scored)[middle],
                    "accuracy": sorted(float(e["accuracy"]) for e in scored)[middle],
                    "kept": dict.fromkeys(group.members, 1.0 - ratio)}
        if measured:
            table.groups[group.name] = {"ratios": measured, "estimated": True}
