"""CompressionPlan: JSON round trip and validation that names the layer and value."""

from __future__ import annotations

import pytest

from autocompress.errors import PlanError
from autocompress.model.inventory import Inventory, LayerInfo, PruneGroup
from autocompress.model.plan import CompressionPlan


def _inventory() -> Inventory:
    layers = [
        LayerInfo("conv1", "Conv2d", 288, 18432, (1, 32, 8, 8), True, None),
        LayerInfo("fc", "Linear", 650, 640, (1, 10), True, None),
        LayerInfo("tiny", "Conv2d", 4, 16, (1, 1, 2, 2), False, "too small to pay for its scales"),
    ]
    groups = [
        PruneGroup("conv1", ["conv1"], 32, True, None),
        PruneGroup("fc", ["fc"], 10, False, "classifier output: its channels are the classes"),
    ]
    return Inventory(layers, groups)


def test_json_round_trip_is_identity() -> None:
    plan = CompressionPlan(
        bits={"conv1": 4, "fc": 8},
        prune={"conv1": 0.25},
        sparsity={"fc": 0.5},
        kd_temperature=3.5,
        kd_alpha=0.8,
        feature_pairs=(("conv1", "conv1"),),
        feature_weight=0.1,
        finetune_steps=42,
        learning_rate=5e-4,
    )
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.bits_for("conv1") == 4 and again.bits_for("missing") == 32


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"bits": {"conv1": 6}}, "'conv1': weight bit width 6"),
        ({"prune": {"conv1": 1.0}}, "prune ratio 1.0 is outside [0, 1)"),
        ({"prune": {"conv1": -0.1}}, "outside [0, 1)"),
        ({"activation_bits": 4}, "activation_bits 4"),
        ({"kd_temperature": 0}, "kd_temperature"),
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"feature_weight": 0.5}, "feature_pairs"),
    ],
)
def test_bad_values_name_the_layer_and_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(PlanError, match=None) as info:
        CompressionPlan(**kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_against_inventory_names_layer_and_allowed() -> None:
    inv = _inventory()
    CompressionPlan(bits={"conv1": 8}, prune={"conv1": 0.3}).validate(inv)
    with pytest.raises(PlanError) as info:
        CompressionPlan(bits={"nope": 8}).validate(inv)
    assert "'nope' does not exist" in str(info.value) and "conv1" in str(info.value)
    with pytest.raises(PlanError) as info:
        CompressionPlan(prune={"fc": 0.3}).validate(inv)
    assert "classifier output" in str(info.value)
    with pytest.raises(PlanError) as info:
        CompressionPlan(bits={"tiny": 8}).validate(inv)
    assert "too small" in str(info.value)
    with pytest.raises(PlanError):
        CompressionPlan(feature_pairs=(("conv1", "ghost"),), feature_weight=1.0).validate(inv)


def test_unknown_json_key_is_refused() -> None:
    with pytest.raises(PlanError, match="unknown plan key"):
        CompressionPlan.from_dict({"bitz": {}})
    with pytest.raises(PlanError, match="not valid JSON"):
        CompressionPlan.from_json("{nope")


def test_summary_counts_widths() -> None:
    plan = CompressionPlan(bits={"a": 8, "b": 4, "c": 32}, prune={"g": 0.5})
    assert plan.summary() == "4b:1 8b:1 fp:1 prune~0.50x1"
