"""build_inventory on real models: names, FLOPs, shapes, exclusions, JSON round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch import nn

from autocompress.errors import InputError, PlanError
from autocompress.intake.demo import build_demo_model
from autocompress.model import flops as flop_count
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.transform.prune_graph import CLASSIFIER_REASON
from autocompress.transform.survey import build_inventory
from tests.tiny_models import tiny_vit


def _fvcore(model: nn.Module, x: torch.Tensor) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model.eval(), x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


@pytest.fixture(scope="module")
def demo() -> tuple[nn.Module, torch.Tensor, Inventory]:
    torch.manual_seed(0)
    model = build_demo_model(1, 10).eval()
    x = torch.randn(1, 1, 8, 8)
    return model, x, build_inventory(model, x)


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, torch.Tensor, Inventory]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    return model, x, build_inventory(model, x)


def test_layers_in_model_order_with_params_shapes_and_flops(demo: tuple) -> None:
    model, _, inv = demo
    assert [i.name for i in inv.layers] == [n for n, _ in model.named_modules() if n]
    assert inv.quantizable_layers() == [
        "conv1",
        "block1.conv1",
        "block1.conv2",
        "down_conv",
        "block2.conv1",
        "block2.conv2",
        "fc",
    ]
    conv = inv.layer("down_conv")
    assert conv.type == "Conv2d" and conv.params == 64 * 32 * 9
    assert conv.output_shape == [1, 64, 4, 4]
    assert conv.flops == 64 * 32 * 9 * 4 * 4  # one multiply-add per weight per output pixel
    assert inv.layer("fc").flops == 64 * 10 and inv.layer("fc").output_shape == [1, 10]
    assert inv.layer("block1").params == 2 * 32 * 32 * 9 + 2 * 2 * 32  # convs + BN affine
    assert inv.total_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(InputError, match="'nope'"):
        inv.layer("nope")


def test_flops_match_fvcore(resnet18: tuple) -> None:
    model, x, inv = resnet18
    analysis = _fvcore(model, x)
    assert inv.total_flops == analysis.total() > 0
    by_module = analysis.by_module()
    for info in inv.layers:
        assert info.flops == by_module.get(info.name, 0), info.name
    assert "aten::add_" in inv.uncounted_ops or "aten::add" in inv.uncounted_ops


def test_exclusion_reasons(demo: tuple) -> None:
    _, _, inv = demo
    # The classifier is quantizable but never prunable: its channels are the classes.
    assert "fc" in inv.quantizable_layers()
    assert "fc" not in inv.prunable_groups()
    assert inv.excluded_reason("fc") == CLASSIFIER_REASON
    assert inv.excluded_reason("bn1") == "BatchNorm2d is not a Conv/Linear layer"
    assert "container" in inv.excluded_reason("block1")
    assert "coupled to group 'conv1'" in inv.excluded_reason("block1.conv2")
    assert inv.excluded_reason("conv1") is None
    assert inv.excluded_reason("no.such.layer") is None
    assert inv.prunable_groups() == ["conv1", "block1.conv1", "down_conv", "block2.conv1"]
    assert inv.group("down_conv").members == ["down_conv", "block2.conv2"]


def test_plan_validate_uses_the_inventory_reasons(demo: tuple) -> None:
    _, _, inv = demo
    CompressionPlan(bits={"fc": 8, "conv1": 4}, prune={"conv1": 0.3}).validate(inv)
    with pytest.raises(PlanError, match=r"prunable group 'fc' cannot be used: classifier output"):
        CompressionPlan(prune={"fc": 0.3}).validate(inv)
    with pytest.raises(PlanError, match=r"'bn1' cannot be used: BatchNorm2d is not a Conv/Linear"):
        CompressionPlan(bits={"bn1": 8}).validate(inv)
    with pytest.raises(PlanError, match=r"'block2\.conv2' cannot be used: .*coupled.*'down_conv'"):
        CompressionPlan(prune={"block2.conv2": 0.3}).validate(inv)


def test_small_layers_and_groups_are_excluded() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # 108 weights but only 4 channels: quantizable, not prunable
        nn.ReLU(),
        nn.Conv2d(4, 16, 1),  # 64 weights: just big enough to quantize
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),  # 48 weights: too small to pay for per-channel scales
    ).eval()
    inv = build_inventory(model, torch.randn(1, 3, 8, 8))
    assert inv.quantizable_layers() == ["0", "2"]
    assert inv.excluded_reason("6") == "too small to pay for its scales (48 weights < 64)"
    assert inv.excluded_reason("1") == "ReLU is not a Conv/Linear layer"
    group = inv.group("0")
    assert not group.prunable and group.excluded_reason == "too small (4 channels < 8)"
    assert inv.prunable_groups() == ["2"]
    loose = build_inventory(model, torch.randn(1, 3, 8, 8), min_channels=2, min_weights=1)
    assert loose.prunable_groups() == ["0", "2"] and "6" in loose.quantizable_layers()


def test_json_round_trip(resnet18: tuple) -> None:
    _, _, inv = resnet18
    text = json.dumps(inv.to_dict())
    again = Inventory.from_dict(json.loads(text))
    assert again == inv
    assert again.layer("layer1.0.conv1").output_shape == [1, 64, 8, 8]
    with pytest.raises(InputError, match="malformed"):
        Inventory.from_dict({"layers": [{"name": "x"}], "groups": []})


def test_resnet18_inventory_groups(resnet18: tuple) -> None:
    _, _, inv = resnet18
    assert inv.prunable_groups()[:3] == ["conv1", "layer1.0.conv1", "layer1.1.conv1"]
    assert inv.group("conv1").members == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert len(inv.quantizable_layers()) == 21  # 20 convs + fc


def test_vit_attention_layers_are_reported() -> None:
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    inv = build_inventory(model, x)
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    # MultiheadAttention uses out_proj's weight directly: both projections are quantized
    # through the attention module (its input projection is named by the module itself).
    assert out_proj in inv.quantizable_layers()
    assert "encoder.layers.encoder_layer_0.self_attention" in inv.quantizable_layers()
    assert "encoder.layers.encoder_layer_0.mlp.0" in inv.quantizable_layers()
    assert "no longer runs" in inv.excluded_reason("conv_proj")  # the embedding width group
    assert inv.prunable_groups() == [
        "encoder.layers.encoder_layer_0.mlp.0",
        "encoder.layers.encoder_layer_1.mlp.0",
    ]
    # attention counted (fvcore alone has no formula for the fused attention op)
    assert inv.total_flops > _fvcore(model, x).total()
    assert inv.total_flops == flop_count.count(model, x).total
