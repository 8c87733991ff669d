"""A candidate's models and file: BatchNorm batches for a pruned student, the untrained QAT
model, and the ONNX export of a plan or a baseline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from autocompress.model.plan import CompressionPlan
from autocompress.transform import quantize
from autocompress.trial.context import SearchContext


def bn_batches(ctx: SearchContext, number: int) -> Iterator[torch.Tensor]:
    """Training inputs for BatchNorm re-estimation after pruning; seeded per trial like
    the fine-tune, so a trial rebuilt from its number sees the same images."""
    training = ctx.training
    batches = ctx.task.data.batches(
        "train", training.batch_size, shuffle=True, seed=training.seed + number
    )
    return (x for x, _ in batches)


def untrained_qat(
    ctx: SearchContext,
    student: nn.Module,
    plan: CompressionPlan,
    calibration: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Fake-quant model at the plan's widths with calibrated observers, no fine-tune."""
    qat = quantize.prepare_qat(student, plan)
    # Observers from real data, in eval mode (BatchNorm left unfolded keeps its statistics).
    quantize.calibrate(qat, ctx.calibration if calibration is None else calibration)
    return qat


def export_candidate(
    ctx: SearchContext,
    student: nn.Module,
    qat: nn.Module | None,
    plan: CompressionPlan,
    baseline: str | None,
    out_dir: Path,
    name: str = "model.onnx",
    calibration: list[torch.Tensor] | None = None,
) -> Path:
    """The candidate's ONNX file in ``out_dir``: a baseline made from the fp32 file, a PTQ
    plan's float student calibrated by ONNX Runtime, or the QAT model (untrained when not
    given)."""
    calibration = ctx.calibration if calibration is None else calibration
    path = out_dir / name
    example = ctx.task.data.example_input(1)
    if baseline == "fp32":
        path.write_bytes(ctx.fp32_onnx.read_bytes())
        return path
    if baseline == "int8-ptq":
        quantize.ptq_static(ctx.fp32_onnx, path, calibration, weight_bits=8)
        return path
    if baseline == "int8-dynamic":  # the guide's first recipe: int8 weights, activations
        quantize.ptq_dynamic(ctx.fp32_onnx, path)  # quantized at run time
        return path
    if plan.is_ptq:  # the float student, activations calibrated by ONNX Runtime
        info = quantize.export_onnx(student, example, path, plan, calibration,
                                    calibration_method=plan.calibration)
        return Path(info.path)
    if qat is None:
        qat = untrained_qat(ctx, student, plan, calibration)
    info = quantize.export_onnx(qat, example, path, plan, calibration)
    return Path(info.path)
