"""A small latency model fitted on the study's own pre-checks: feasible-first proposals.

Latency depends on structure and bit widths only, and every pre-check measures one structure.
After a handful of them, a linear model of the latency ratio to fp32 in the multiply-adds
left at each weight width predicts a new plan's ratio from its built structure alone (no
export, no ONNX Runtime session), so a plan the model places far over the latency budget
can be recorded as rejected without the pre-check. Simple and measured: every prediction the
search makes before a pre-check it does run is recorded beside the measured ratio, and the
model's hit rate is stored on the study.

Features of a structure (fractions of the teacher's totals over the inventory's convolutions
and linear layers, in inventory order): MACs left at 32, 8 and 4 bits (weight-only layers
count as 32: they run in float); output elements left at 8 and 4 bits (quantizing and
requantizing an integer layer's activations costs per element, not per MAC); the share of
neighbouring layers where the graph switches between float and integer (a Quantize or
Dequantize node each); plus an intercept for what the inventory does not count (pooling,
additions, the runtime's fixed cost per call). Chosen by measurement
(benchmarks/latency_model_fit.py): fitted on the probes, the MAC-only model on first-look
timings erred by a median 9-14% on uniformly pruned int8/float ResNet-20 structures, this one
on careful timings by 3-7%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls
from torch import nn

from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan

WIDTHS = (32, 8, 4)
MIN_OBSERVATIONS = 6  # distinct structures before the model may predict
# "Far over": the model may reject without measuring only beyond this multiple of the budget,
# and only while its checked predictions were within MAX_ERROR of the measured ratio.
FAR_OVER = 1.3
MAX_ERROR = 0.15
AUDIT_EVERY = 4  # every 4th plan the model would reject is pre-checked anyway, to keep it honest
# Ridge: the width columns are collinear in a study that never mixes widths, and the probes
# (uniform structures) never switch between float and integer mid-graph.
_RIDGE = 1e-2


FEATURES = ("intercept", "macs_fp32", "macs_int8", "macs_int4", "outputs_int8",
            "outputs_int4", "float_int_switches")


@dataclass(frozen=True)
class LayerCost:
    """One convolution or linear layer of a structure, as the latency model sees it."""

    macs: float  # multiply-adds left
    outputs: float  # output elements left (per image)
    width: int  # 32 (float, weight-only included), 8 or 4


def cost_features(layers: Sequence[LayerCost], total_macs: float,
                  total_outputs: float) -> list[float]:
    """The model's features (FEATURES) of a structure's layers, in graph order."""
    macs = dict.fromkeys(WIDTHS, 0.0)
    outputs = dict.fromkeys(WIDTHS, 0.0)
    switches = 0
    for i, layer in enumerate(layers):
        width = layer.width if layer.width in macs else 32
        macs[width] += layer.macs
        outputs[width] += layer.outputs
        if i and (width < 32) != (layers[i - 1].width < 32):
            switches += 1
    m = total_macs or 1.0
    o = total_outputs or 1.0
    return [1.0, macs[32] / m, macs[8] / m, macs[4] / m, outputs[8] / o, outputs[4] / o,
            switches / max(len(layers), 1)]


def structure_features(
    student: nn.Module, plan: CompressionPlan, inventory: Inventory, teacher: nn.Module
) -> list[float]:
    """FEATURES of a built student."""
    teacher_modules = dict(teacher.named_modules())
    student_modules = dict(student.named_modules())
    # Convolutions and linear layers only: the inventory also lists containers (whose FLOPs
    # are their children's) and BatchNorms (folded away in every exported file).
    layers = [layer for layer in inventory.layers if is_weight_layer(layer.type)]
    costs: list[LayerCost] = []
    for layer in layers:
        weight_t = getattr(teacher_modules.get(layer.name), "weight", None)
        weight_s = getattr(student_modules.get(layer.name), "weight", None)
        if weight_t is None or weight_s is None or not layer.flops:
            continue
        # Output positions are unchanged by channel pruning: MACs scale with the weights
        # kept, output elements with the output channels kept.
        macs = layer.flops * weight_s.numel() / max(weight_t.numel(), 1)
        outputs = output_elements(layer) * weight_s.shape[0] / max(weight_t.shape[0], 1)
        # Weight-only layers run in float once ONNX Runtime folds their weights at load.
        bits = 32 if plan.activation_bits >= 32 else plan.bits.get(layer.name, 32)
        costs.append(LayerCost(macs, outputs, bits))
    return cost_features(costs, float(sum(layer.flops for layer in layers)),
                         float(sum(output_elements(layer) for layer in layers)))


def output_elements(layer: Any) -> float:
    """Output elements per image of an inventory layer (its first call, batch dimension
    dropped)."""
    shape = layer.output_shape or []
    return float(np.prod(shape[1:])) if len(shape) > 1 else 0.0


def is_weight_layer(type_name: str) -> bool:
    """A convolution or linear layer (what the latency model counts)."""
    return type_name.startswith(("Conv", "Linear")) and "Transpose" not in type_name


@dataclass
class LatencyModel:
    """Non-negative ridge least-squares fit of the latency ratio to fp32 on structure
    features."""

    observations: dict[str, tuple[list[float], float]] = field(default_factory=dict)
    checked: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured)
    _coef: np.ndarray | None = None
    _would_reject: int = 0

    def observe(self, key: str, features: list[float], ratio: float) -> None:
        """One measured structure (a pre-check); refits when the data changed."""
        if key in self.observations:
            return
        self.observations[key] = (list(features), float(ratio))
        self._coef = None

    def record_check(self, predicted: float, measured: float) -> None:
        self.checked.append((float(predicted), float(measured)))

    @property
    def ready(self) -> bool:
        return len(self.observations) >= MIN_OBSERVATIONS

    def predict(self, features: list[float]) -> float | None:
        """Predicted ratio to fp32, or None while the model has too few structures."""
        coef = self._fit()
        if coef is None:
            return None
        return float(np.asarray(features, dtype=np.float64) @ coef)

    def _fit(self) -> np.ndarray | None:
        """The least-squares coefficients (refitted after new observations), or None while
        the model has too few structures."""
        if not self.ready:
            return None
        if self._coef is None:
            x = np.array([f for f, _ in self.observations.values()], dtype=np.float64)
            y = np.array([r for _, r in self.observations.values()], dtype=np.float64)
            # Non-negative: every MAC, output element and switch costs time. An unconstrained
            # fit gave int8 MACs a negative cost (offset by their outputs'), and the planner,
            # which minimises damage under the predicted latency, went straight for that:
            # unpruned int8/float mixes predicted at 0.45x of fp32.
            ridge = np.sqrt(_RIDGE) * np.eye(x.shape[1])
            self._coef, _ = nnls(np.vstack([x, ridge]),
                                 np.concatenate([y, np.zeros(x.shape[1])]))
        return self._coef

    def error(self) -> float | None:
        """Median relative error of the predictions checked against a pre-check."""
        if not self.checked:
            return None
        return float(np.median([abs(p - m) / m for p, m in self.checked if m > 0]))

    def trusted(self) -> bool:
        err = self.error()
        return self.ready and err is not None and len(self.checked) >= 3 and err <= MAX_ERROR

    def should_skip(self, predicted_ratio: float | None, budget_ratio: float | None) -> bool:
        """Reject without a pre-check: trusted model, far over budget, not an audit turn."""
        if predicted_ratio is None or budget_ratio is None or not self.trusted():
            return False
        if predicted_ratio <= budget_ratio * FAR_OVER:
            return False
        self._would_reject += 1
        return self._would_reject % AUDIT_EVERY != 0

    def summary(self, budget_ratio: float | None) -> dict[str, Any]:
        """What is stored on the study: the fit and how often it was right."""
        right = None
        if budget_ratio is not None and self.checked:
            right = sum((p <= budget_ratio) == (m <= budget_ratio) for p, m in self.checked)
        return {
            "features": list(FEATURES),
            "coefficients": None if self._fit() is None else [float(c) for c in self._fit()],
            "observations": len(self.observations),
            "checked": len(self.checked),
            "verdicts_right": right,
            "median_relative_error": self.error(),
        }
