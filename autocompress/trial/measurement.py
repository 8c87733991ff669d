"""A trial's final measurement: every recorded figure taken on the exported ONNX file that
becomes the trial's artifact (design rule 1), then its constraints and objective values. For
the executorch-xnnpack target the figures are the ExecuTorch program's (``X.pte`` beside the
ONNX file), which is stored with the trial too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from autocompress.model.plan import CompressionPlan
from autocompress.results import metrics
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import measure, timing
from autocompress.runtime.latency_reference import pooled_ratio
from autocompress.runtime.scoring import onnx_accuracy
from autocompress.study import attrs as trial_attrs
from autocompress.transform import quantize
from autocompress.trial.constraints import set_constraints
from autocompress.trial.context import Precheck, SearchContext

MEASURE_ROUNDS = 5  # the trial's final measurement: latency_repeats split over this many


def measure_trial(
    ctx: SearchContext,
    trial: Any,
    artifact: Path,
    student: nn.Module,
    plan: CompressionPlan,
    pre: Precheck,
    structure: str,
) -> tuple[float, ...]:
    """Score, time and size ``artifact``, record it all on the trial with its constraints
    (the latency pooled over the structure's measurements this run), upload the file;
    returns the objective values."""
    settings = ctx.measurement
    accuracy, test_accuracy = _accuracies(ctx, artifact, pre.session_options)
    inter = _timed(ctx, artifact, pre.session_options)
    measured = _measured_file(ctx, artifact)
    size, zipped = measure.file_size(measured), measure.zipped_size(measured)
    objective_size = zipped if settings.size_metric == "zip" else size
    earlier = ctx.structure_ratios.setdefault(structure, [])
    estimate = ctx.budget_latency_ms(inter, pooled_ratio(inter.ratio, earlier))
    trial.set_user_attr(trial_attrs.LATENCY_POOLED, len(earlier) + 1)
    earlier.append(inter.ratio)
    example = ctx.task.data.example_input(1)
    attrs: dict[str, Any] = {
        trial_attrs.ACCURACY: accuracy,
        trial_attrs.TEST_ACCURACY: test_accuracy,
        trial_attrs.SIZE: size,
        trial_attrs.ZIP_SIZE: zipped,
        trial_attrs.SIZE_METRIC: settings.size_metric,
        trial_attrs.LATENCY: inter.candidate.median_ms,
        trial_attrs.LATENCY_SPREAD: inter.candidate.spread_ms,
        trial_attrs.LATENCY_P10: inter.candidate.p10_ms,
        trial_attrs.LATENCY_P90: inter.candidate.p90_ms,
        trial_attrs.LATENCY_VS_FP32: inter.ratio,
        trial_attrs.LATENCY_ESTIMATE: estimate,
        trial_attrs.FP32_LATENCY: inter.reference.median_ms,
        trial_attrs.RUNTIME: json.dumps(ctx.runtime_info(pre.session_options)),
        trial_attrs.FLOPS: measure.count_flops(student, example),
        trial_attrs.BOPS: metrics.bit_operations(metrics.layer_macs(student, example), plan),
        trial_attrs.PARAMS: measure.count_params(student),
        trial_attrs.WEIGHT_TYPES: json.dumps(_weight_types(ctx, artifact, measured)),
        trial_attrs.ARTIFACT_SHA256: measure.sha256_file(artifact),
    }
    if measured != artifact:  # the figures are the program's: store it with the trial too
        held = {k: v for k, v in ctx.programs.get(str(measured), {}).items() if k != "path"}
        attrs[executorch_runtime.PROGRAM_ATTR] = json.dumps(held)
        attrs[executorch_runtime.ARTIFACT_SHA256_ATTR] = measure.sha256_file(measured)
        attrs[executorch_runtime.ARTIFACT_ID_ATTR] = ctx.upload(trial, measured)
    if ctx.reference is not None:
        attrs[trial_attrs.FP32_REFERENCE] = ctx.reference.median_ms
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    set_constraints(trial, ctx.budgets, estimate, objective_size)
    # Upload while the trial is RUNNING (Optuna writes metadata before the file).
    trial.set_user_attr(trial_attrs.ARTIFACT_ID, ctx.upload(trial, artifact))
    return objective_values(settings.objectives, accuracy, objective_size, estimate)


def _measured_file(ctx: SearchContext, artifact: Path) -> Path:
    """The file the target runs: the ``.pte`` beside the ONNX file for executorch-xnnpack
    (its bytes are the size figures), else the ONNX file itself."""
    if ctx.measurement.target == executorch_runtime.TARGET:
        return executorch_runtime.program_path(artifact)
    return artifact


def _weight_types(ctx: SearchContext, artifact: Path, measured: Path) -> dict[str, str]:
    """Per-layer weight types as the measured file holds them (a program's as its lowering
    read them back from the XNNPACK delegates)."""
    if measured == artifact:
        return quantize.onnx_weight_types(artifact)
    return dict(ctx.programs.get(str(measured), {}).get("weight_types", {}))


def _accuracies(
    ctx: SearchContext, artifact: Path, options: dict[str, str]
) -> tuple[float, float]:
    """Validation and test accuracy of the file. Under the same session options as the
    recorded latency: the options change the arithmetic (disable_quant_qdq folds int4
    weights to float at load). Scoring is throughput work, not a timing: it may use the
    fine-tune's threads (on CIFAR-10 the 15,000 val + test images took a third of a 40-step
    trial at one thread)."""
    settings = ctx.measurement
    scoring = max(settings.threads, settings.train_threads)
    accuracy = onnx_accuracy(
        artifact, ctx.task.data.batches("val", 256), threads=scoring, session_options=options,
        target=settings.target, metric=ctx.task.metric)
    test_accuracy = onnx_accuracy(
        artifact, ctx.task.data.batches("test", 256), threads=scoring,
        session_options=options, target=settings.target, metric=ctx.task.metric)
    return accuracy, test_accuracy


def _timed(
    ctx: SearchContext, artifact: Path, options: dict[str, str]
) -> timing.InterleavedLatency:
    """The file timed against fp32, interleaved, ``latency_repeats`` runs a side in all."""
    settings = ctx.measurement
    return timing.time_interleaved(
        artifact,
        ctx.fp32_onnx,
        ctx.latency_shape,
        threads=settings.threads,
        candidate_options=options,
        reference_options={},
        rounds=MEASURE_ROUNDS,
        repeats=max(1, settings.latency_repeats // MEASURE_ROUNDS),
        target=settings.target,
    )


def objective_values(
    objectives: tuple[str, ...], accuracy: float, size: float, latency: float
) -> tuple[float, ...]:
    """The trial's return value: the figures in the study's objective order."""
    by_name = {"accuracy": accuracy, "size": float(size), "latency": latency}
    return tuple(by_name[o] for o in objectives)
