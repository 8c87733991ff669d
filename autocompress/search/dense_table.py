"""The sensitivity table on the search's whole prune grid: each group's KL score and kept
shares interpolated between the few ratios the sensitivity pass measured, so the proposer
(``proposals``) can price a move of one grid step."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from autocompress.config.settings import SpaceSettings
from autocompress.model import space
from autocompress.search.sensitivity import Sensitivity


def densify(sens: Sensitivity, settings: SpaceSettings) -> Sensitivity:
    """The table with every prune ratio of the search grid, each group's KL and kept shares
    interpolated linearly between the ratios it was scored at (0: no damage, all kept)."""
    grid = [round(i * settings.prune_step, 6)
            for i in range(1, int(space.prune_high(settings) / settings.prune_step + 1e-9) + 1)]
    groups: dict[str, dict[str, Any]] = {}
    for name, entry in sens.groups.items():
        scored = sorted((float(r), v) for r, v in entry["ratios"].items())
        if not scored:
            groups[name] = entry
            continue
        points = [(0.0, {"kl": 0.0, "kept": dict.fromkeys(scored[0][1]["kept"], 1.0)}), *scored]
        ratios = {f"{r:g}": _interpolated(points, r) for r in grid if r <= scored[-1][0] + 1e-9}
        groups[name] = {**entry, "ratios": ratios}
    return dataclasses.replace(sens, groups=groups)


def _interpolated(points: list[tuple[float, dict[str, Any]]], ratio: float) -> dict[str, Any]:
    for (r0, a), (r1, b) in itertools.pairwise(points):
        if r0 - 1e-9 <= ratio <= r1 + 1e-9:
            w = 0.0 if r1 == r0 else (ratio - r0) / (r1 - r0)
            kept = {k: (1 - w) * float(a["kept"].get(k, 1.0)) + w * float(v)
                    for k, v in b["kept"].items()}
            return {"kl": (1 - w) * float(a["kl"]) + w * float(b["kl"]), "kept": kept}
    return dict(points[-1][1])


__all__ = ["densify"]
