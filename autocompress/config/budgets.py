"""Budgets: a latency or size limit parsed from what the user wrote ("50ms", "0.6x",
"8MB"), and the byte sizes shown beside them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from autocompress.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """A hard limit a candidate must meet: latency in ms or size in bytes."""

    kind: str  # "latency" | "size"
    value: float  # milliseconds for latency, bytes for size; the ratio while ``relative``
    text: str  # as the user wrote it, e.g. "50ms" or "0.6x"
    # "0.6x": a share of the fp32 model's latency on the machine that runs the study, turned
    # into milliseconds by ``resolve`` once the study's fp32 reference is measured
    relative: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "value": self.value, "text": self.text}
        if self.relative:
            out["relative"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        return cls(kind=str(data["kind"]), value=float(data["value"]), text=str(data["text"]),
                   relative=bool(data.get("relative", False)))

    def resolve(self, reference_ms: float) -> Budget:
        """In milliseconds: a relative budget times the fp32 reference (others unchanged)."""
        if not self.relative:
            return self
        return Budget("latency", self.value * reference_ms, self.text)

    def violation(self, latency_ms: float, size_bytes: float) -> float:
        """Optuna constraint value: > 0 means broken (relative excess, so units don't matter)."""
        if self.relative:
            raise ValueError(f"budget {self.text} is relative: resolve() it first")
        measured = latency_ms if self.kind == "latency" else size_bytes
        return (measured - self.value) / self.value

    def describe(self, latency_ms: float, size_bytes: float) -> str:
        if self.kind == "latency":
            return f"latency {latency_ms:.3g} ms vs budget {self.shown()}"
        return f"size {format_bytes(size_bytes)} vs budget {self.text}"

    def shown(self) -> str:
        """The budget as written, with its milliseconds when it was a share of fp32."""
        if self.kind == "latency" and self.text.lower().endswith("x") and not self.relative:
            return f"{self.text} of fp32 = {self.value:.3g} ms"
        return self.text


_LATENCY_UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_BUDGET_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]+)\s*$")


def parse_budget(text: str) -> Budget:
    """``50ms``, ``0.05s``, ``500us``, ``0.6x`` (latency; x: of the fp32 model's on this
    machine) or ``8MB``, ``512KiB`` (size)."""
    match = _BUDGET_RE.match(str(text))
    if not match:
        raise BudgetError(
            f"budget {text!r} is not a latency or size; "
            "write e.g. 50ms, 0.05s, 500us, 0.6x (of fp32 latency), 8MB or 512KiB"
        )
    number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number):
        raise BudgetError(f"budget {text!r} is not a finite number; write e.g. 50ms or 8MB")
    if number <= 0:
        raise BudgetError(f"budget {text!r} must be positive; write e.g. 50ms or 8MB")
    if unit in _LATENCY_UNITS:
        return Budget("latency", number * _LATENCY_UNITS[unit], str(text).strip())
    if unit.lower() == "x":
        if number >= 1:
            raise BudgetError(f"budget {text!r} is not below the fp32 latency (1x); write a "
                              "share of it such as 0.6x (or a time such as 50ms)")
        return Budget("latency", number, str(text).strip(), relative=True)
    if unit.lower() in _SIZE_UNITS:
        return Budget("size", number * _SIZE_UNITS[unit.lower()], str(text).strip())
    raise BudgetError(
        f"budget {text!r} has unknown unit {unit!r}; use us, ms, s or x (a share of the "
        "fp32 latency) for latency or B, KB, MB, KiB, MiB for size"
    )


def format_bytes(n: float) -> str:
    for unit, scale in (("MB", 1000**2), ("KB", 1000)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
