"""CompressionPlan: what to do to one model, as plain data keyed by layer names.

A plan never holds live modules, so any trial can be rebuilt, shown and exported from the
study database alone (``plan.to_json()`` is stored with every trial).

Conventions
- ``bits[layer]``: weight bit width of a quantizable layer (Conv/Linear), one of
  ``ALLOWED_WEIGHT_BITS``. A layer missing from the dict stays float (32).
- ``prune[group]``: structured prune ratio of a prunable group, named after the group's
  leading layer (see ``Inventory.groups``). Missing means 0. Ratio in [0, 1).
- ``sparsity[layer]``: unstructured L1 magnitude sparsity in [0, 1); missing means 0.
- ``global_sparsity``: one unstructured L1 fraction ranked across every Conv/Linear weight
  of the model at once (global magnitude pruning: layers with small weights lose more).
  The zeros are kept through the fine-tune, so the exported file holds exactly them.
- ``realisation``: ``"qat"`` (quantization-aware fine-tune with distillation) or ``"ptq"``
  (no fine-tune: ONNX Runtime calibrates the activations of the float student with
  ``calibration``, one of ``CALIBRATION_METHODS``).
- ``activation_bits``: precision of activations entering quantized layers (8, or 16), or
  32 for weight-only quantization: integer weights in the file, float activations (ONNX
  Runtime folds the weights to float at load, so the layer runs at float speed with the
  file size of its integer weights).
  Layers left at 32 bits get no quantization at all, activations included.
- ``activation_scheme``: ``"asymmetric"`` (uint8 activations with a zero point: ONNX
  Runtime's default and its fast x86 path) or ``"symmetric"`` (int8, zero point 0: what
  symmetric-only accelerators take). Written to JSON only when symmetric, so plans recorded
  before it existed read back the same and keep their JSON.
- Quantizable layers also include LSTM/GRU/RNN modules (one width for all their weight
  matrices) and MultiheadAttention modules (the width of the input projection; its
  ``<name>.out_proj`` has its own).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from autocompress.errors import PlanError

if TYPE_CHECKING:
    from autocompress.model.inventory import Inventory

ALLOWED_WEIGHT_BITS: tuple[int, ...] = (32, 8, 4)
ALLOWED_ACTIVATION_BITS: tuple[int, ...] = (8, 16, 32)
ACTIVATION_SCHEMES: tuple[str, ...] = ("asymmetric", "symmetric")
REALISATIONS: tuple[str, ...] = ("qat", "ptq")
# dynamic: ONNX Runtime quantizes activations at run time (no calibration; int8 MatMul/Conv)
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile", "dynamic")
PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CompressionPlan:
    """Per-layer compression settings plus the distillation fine-tune that repairs them."""

    bits: dict[str, int] = field(default_factory=dict)
    prune: dict[str, float] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    global_sparsity: float = 0.0
    activation_bits: int = 8
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    feature_pairs: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 0.0
    finetune_steps: int = 200
    learning_rate: float = 1e-3
    realisation: str = "qat"
    calibration: str = "minmax"
    activation_scheme: str = "asymmetric"

    def __post_init__(self) -> None:
        # Normalise containers so equality and JSON round trips do not depend on input types.
        object.__setattr__(self, "bits", {str(k): int(v) for k, v in self.bits.items()})
        object.__setattr__(self, "prune", {str(k): float(v) for k, v in self.prune.items()})
        object.__setattr__(
            self, "sparsity", {str(k): float(v) for k, v in self.sparsity.items()}
        )
        object.__setattr__(
            self, "feature_pairs", tuple((str(s), str(t)) for s, t in self.feature_pairs)
        )
        self._check_values()

    # -- validation -------------------------------------------------------------------

    def _check_values(self) -> None:
        """Checks that need no model: ranges and allowed values."""
        for layer, b in self.bits.items():
            if b not in ALLOWED_WEIGHT_BITS:
                raise PlanError(
                    f"layer {layer!r}: weight bit width {b} is not supported; "
                    f"use one of {list(ALLOWED_WEIGHT_BITS)}"
                )
        for kind, ratios in (("prune ratio", self.prune), ("sparsity", self.sparsity)):
            for layer, r in ratios.items():
                if not (0.0 <= r < 1.0) or math.isnan(r):
                    raise PlanError(
                        f"layer {layer!r}: {kind} {r} is outside [0, 1); use a value "
                        "such as 0.3 (0 keeps every channel)"
                    )
        if not (0.0 <= self.global_sparsity < 1.0) or math.isnan(self.global_sparsity):
            raise PlanError(
                f"global_sparsity {self.global_sparsity} is outside [0, 1); use e.g. 0.5"
            )
        if self.realisation not in REALISATIONS:
            raise PlanError(
                f"realisation {self.realisation!r} is unknown; use one of {list(REALISATIONS)}"
            )
        if self.calibration not in CALIBRATION_METHODS:
            raise PlanError(
                f"calibration {self.calibration!r} is unknown; use one of "
                f"{list(CALIBRATION_METHODS)}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise PlanError(
                f"activation_scheme {self.activation_scheme!r} is unknown; use one of "
                f"{list(ACTIVATION_SCHEMES)}"
            )
        if self.activation_bits not in ALLOWED_ACTIVATION_BITS:
            raise PlanError(
                f"activation_bits {self.activation_bits} is not supported; "
                f"use one of {list(ALLOWED_ACTIVATION_BITS)}"
            )
        if not self.kd_temperature > 0:
            raise PlanError(f"kd_temperature {self.kd_temperature} must be > 0 (try 4)")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise PlanError(f"kd_alpha {self.kd_alpha} must be in [0, 1] (try 0.9)")
        if self.feature_weight < 0:
            raise PlanError(f"feature_weight {self.feature_weight} must be >= 0")
        if self.feature_pairs == () and self.feature_weight > 0:
            raise PlanError("feature_weight > 0 needs feature_pairs; add pairs or set it to 0")
        if self.finetune_steps < 0:
            raise PlanError(f"finetune_steps {self.finetune_steps} must be >= 0")
        if not self.learning_rate > 0:
            raise PlanError(f"learning_rate {self.learning_rate} must be > 0 (try 1e-3)")

    def validate(self, inventory: Inventory) -> None:
        """Check every layer and group name against the model; raise PlanError naming it."""
        quantizable = {layer.name for layer in inventory.layers if layer.quantizable}
        all_layers = {layer.name for layer in inventory.layers}
        prunable = {group.name for group in inventory.groups if group.prunable}
        for layer in self.bits:
            if layer not in quantizable:
                raise PlanError(_unknown("quantizable layer", layer, quantizable, inventory))
        for group in self.prune:
            if group not in prunable:
                raise PlanError(_unknown("prunable group", group, prunable, inventory))
        for layer in self.sparsity:
            if layer not in quantizable:
                raise PlanError(_unknown("layer for sparsity", layer, quantizable, inventory))
        for student, teacher in self.feature_pairs:
            for name in (student, teacher):
                if name not in all_layers:
                    raise PlanError(
                        _unknown("feature-distillation layer", name, all_layers, inventory)
                    )

    # -- derived views ------------------------------------------------------------------

    @property
    def is_ptq(self) -> bool:
        """Realised by post-training quantization: no fine-tune at all."""
        return self.realisation == "ptq"

    @property
    def sparse(self) -> bool:
        return self.global_sparsity > 0 or any(v > 0 for v in self.sparsity.values())

    def bits_for(self, layer: str) -> int:
        return self.bits.get(layer, 32)

    def ratio_for(self, group: str) -> float:
        return self.prune.get(group, 0.0)

    def summary(self) -> str:
        """Short human summary, e.g. ``8b:5 4b:3 fp:2 prune~0.25``."""
        counts: dict[int, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        parts = [f"{b}b:{n}" if b != 32 else f"fp:{n}" for b, n in sorted(counts.items())]
        if self.activation_bits == 32 and any(b < 32 for b in self.bits.values()):
            parts.append("w-only")
        ratios = [r for r in self.prune.values() if r > 0]
        if ratios:
            parts.append(f"prune~{sum(ratios) / len(ratios):.2f}x{len(ratios)}")
        if self.global_sparsity > 0:
            parts.append(f"sparse{self.global_sparsity:.2f}")
        sparse = [v for v in self.sparsity.values() if v > 0]
        if sparse:
            parts.append(f"sparse~{sum(sparse) / len(sparse):.2f}x{len(sparse)}")
        if self.feature_weight > 0 and self.feature_pairs:
            parts.append(f"featKD{self.feature_weight:.2g}")
        if self.is_ptq:
            parts.append(f"ptq-{self.calibration}")
        if self.activation_scheme == "symmetric" and self.activation_bits < 32 and any(
                b < 32 for b in self.bits.values()):
            parts.append("a-int8" if self.activation_bits == 8 else "a-sym")
        return " ".join(parts) or "fp32"

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_pairs"] = [list(p) for p in self.feature_pairs]
        if self.activation_scheme == "asymmetric":
            del data["activation_scheme"]  # the default: JSON as before the option existed
        data["format_version"] = PLAN_FORMAT_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        data = dict(data)
        data.pop("format_version", None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(
                f"unknown plan key(s) {unknown}; allowed keys are {sorted(known)}"
            )
        pairs = data.get("feature_pairs", ())
        data["feature_pairs"] = tuple(tuple(p) for p in pairs)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"plan is not valid JSON ({exc}); write it with plan.to_json()"
            ) from None
        if not isinstance(data, dict):
            raise PlanError("plan JSON must be an object with keys such as 'bits', 'prune'")
        return cls.from_dict(data)


def _unknown(kind: str, name: str, allowed: set[str], inventory: Inventory) -> str:
    why = inventory.excluded_reason(name)
    shown = ", ".join(sorted(allowed)[:12]) + (" ..." if len(allowed) > 12 else "")
    if why:
        return f"{kind} {name!r} cannot be used: {why}; allowed: {shown or 'none'}"
    return f"{kind} {name!r} does not exist in this model; allowed: {shown or 'none'}"
