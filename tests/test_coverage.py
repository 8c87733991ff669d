"""Architecture coverage: eight torchvision families pruned, mixed int8/int4, exported, run.

Each model is pruned at 30% wherever the dependency graph allows, quantized with a plan that
alternates int8 and int4 over its quantizable layers, exported as QDQ ONNX and run in ONNX
Runtime. A layer the tools cannot handle stays dense and is reported with its reason; the model
as a whole must never fail because of one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from autocompress.model.plan import CompressionPlan
from autocompress.runtime import scoring, sessions
from autocompress.transform import prune, quantize
from autocompress.transform.survey import build_inventory
from tests.tiny_models import tiny_vit

NUM_CLASSES = 10


# family -> (factory, input side)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "plain residual (resnet18)": (lambda: models.resnet18(num_classes=NUM_CLASSES), 32),
    "depthwise-separable (mobilenet_v2)": (
        lambda: models.mobilenet_v2(num_classes=NUM_CLASSES, width_mult=0.5), 32),
    "squeeze-excitation (mobilenet_v3_small)": (
        lambda: models.mobilenet_v3_small(num_classes=NUM_CLASSES), 32),
    "SE + depthwise, compound scaled (efficientnet_b0)": (
        lambda: models.efficientnet_b0(num_classes=NUM_CLASSES), 32),
    "grouped convolution (regnet_x_400mf)": (
        lambda: models.regnet_x_400mf(num_classes=NUM_CLASSES), 32),
    "channel shuffle (shufflenet_v2_x0_5)": (
        lambda: models.shufflenet_v2_x0_5(num_classes=NUM_CLASSES), 32),
    "concatenation (squeezenet1_1)": (
        lambda: models.squeezenet1_1(num_classes=NUM_CLASSES), 64),
    "vision transformer (tiny ViT)": (lambda: tiny_vit(NUM_CLASSES), 32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_quantize_export_run(family: str, tmp_path: Path) -> None:
    factory, side = FAMILIES[family]
    torch.manual_seed(0)
    model = factory().eval()
    example = torch.randn(1, 3, side, side)
    inventory = build_inventory(model, example)

    prunable = inventory.prunable_groups()
    plan_prune = {group: 0.3 for group in prunable}
    excluded = {g.name: g.excluded_reason for g in inventory.groups if not g.prunable}
    assert all(reason for reason in excluded.values()), "every excluded group says why"
    layers = inventory.quantizable_layers()
    assert layers, family
    bits = {layer: (8 if i % 2 == 0 else 4) for i, layer in enumerate(layers)}
    plan = CompressionPlan(bits=bits, prune=plan_prune)
    plan.validate(inventory)

    pruned, report = prune.prune_with_report(model, plan, example)
    if plan_prune:
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in pruned.parameters())
        assert after < before, f"{family}: pruning removed nothing ({report.failed})"
    pruned = quantize.fold_batchnorm(pruned.eval())
    qat = quantize.prepare_qat(pruned, plan)
    calibration = [torch.randn(4, 3, side, side) for _ in range(2)]
    quantize.calibrate(qat, calibration)
    info = quantize.export_onnx(qat, example, tmp_path / "m.onnx", plan, calibration)

    found = set(info.weight_types.values())
    assert {"INT8", "INT4"} <= found, f"{family}: weight types in file {found}"
    outputs = scoring.predictions(info.path, [example], threads=1)
    assert np.asarray(outputs).shape == (1,)
    logits = _onnx_logits(info.path, example)
    assert logits.shape == (1, NUM_CLASSES)
    assert np.isfinite(logits).all()


def _onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = sessions.make_session(path, threads=1)
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.numpy()})[0]
