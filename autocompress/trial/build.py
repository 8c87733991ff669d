"""A candidate's models and files: BatchNorm batches for a pruned student, the untrained QAT
model, the ONNX export of a plan or a baseline, and for the ``executorch-xnnpack`` target the
ExecuTorch program beside it, lowered from the same PyTorch model (``X.onnx`` -> ``X.pte``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from autocompress.intake import Task
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import executorch as executorch_runtime
from autocompress.transform import quantize
from autocompress.transform.quantize import executorch_lower
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
    given). For the executorch-xnnpack target its program is written beside it."""
    calibration = ctx.calibration if calibration is None else calibration
    if ctx.measurement.target == executorch_runtime.TARGET:
        if qat is None and baseline is None and not plan.is_ptq:
            qat = untrained_qat(ctx, student, plan, calibration)
        write_program(ctx, student, qat, plan, baseline, out_dir / name, calibration)
    return _export_onnx(ctx, student, qat, plan, baseline, out_dir / name, calibration)


def _export_onnx(
    ctx: SearchContext,
    student: nn.Module,
    qat: nn.Module | None,
    plan: CompressionPlan,
    baseline: str | None,
    path: Path,
    calibration: list[torch.Tensor],
) -> Path:
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


def write_program(
    ctx: SearchContext,
    student: nn.Module,
    qat: nn.Module | None,
    plan: CompressionPlan,
    baseline: str | None,
    onnx_path: Path,
    calibration: list[torch.Tensor],
) -> Path:
    """The candidate's ExecuTorch program beside ``onnx_path``, from the same PyTorch model
    the ONNX file is made from, at the plan's widths where XNNPACK has kernels; what it holds
    is kept in ``ctx.programs`` for the trial's record."""
    path = executorch_runtime.program_path(onnx_path)
    if baseline == "fp32":  # the study's reference program, byte for byte
        reference = ctx.fp32_program
        path.write_bytes(reference.read_bytes())
        ctx.programs[str(path)] = dict(ctx.programs.get(str(reference), {}), path=str(path))
        return path
    source = student if baseline is not None or plan.is_ptq or qat is None else qat
    dynamic = (baseline == "int8-dynamic" or plan.calibration == quantize.DYNAMIC
               or (baseline is None and not plan.is_ptq and plan.activation_bits != 8))
    info = executorch_lower.lower_program(
        source, ctx.task.data.example_input(ctx.measurement.latency_batch_size), path,
        plan.bits, calibration, dynamic=dynamic)
    ctx.programs[str(path)] = info.to_dict()
    return path


def write_reference_program(task: Task, fp32_onnx: Path, target: str,
                            batch_size: int) -> Path | None:
    """For the executorch-xnnpack target, the teacher's fp32 program beside the study's fp32
    ONNX file (``fp32.pte``, on which the session scores the teacher and times the fp32
    reference, and every candidate program is timed against), for inputs of ``batch_size``
    (the latency batch); None, and nothing written, for the other targets."""
    if target != executorch_runtime.TARGET:
        return None
    return executorch_lower.lower_program(
        task.model, task.data.example_input(batch_size),
        executorch_runtime.program_path(fp32_onnx)).path
