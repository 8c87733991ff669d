"""The latency pre-check: a structure's size and latency at its bit widths, before any
fine-tuning (design rule 4), and the latency model's prediction that may skip it.

The pre-check exports the pruned structure at the planned bit widths and times it against
the fp32 file, so an over-budget candidate is rejected cheaply; its result is cached by
structure, because latency does not depend on fine-tuned weight values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from autocompress.config.budgets import Budget
from autocompress.config.settings import MeasurementSettings
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import measure, sessions, timing
from autocompress.runtime.latency_model import structure_features
from autocompress.study import attrs as trial_attrs
from autocompress.trial.build import export_candidate
from autocompress.trial.context import Precheck, SearchContext, precheck_key, runtime_quantized

PRECHECK_REPEATS = 7  # runs a side per round of the careful look (close verdicts, probes)
PRECHECK_FIRST_LOOK = 5  # runs per side of the first look, which settles clear verdicts
PRECHECK_CLEAR_MARGIN = 1.3  # "clear": every latency budget more than 30% away
# What the latency model learns from: 4 interleaved rounds. A first look (5 runs a side) put
# ResNet-20's own fp32 structure at 1.36x of the fp32 file and int8 pruned 50% slower than
# 25%; the model fitted on such looks erred by 13-16% (benchmarks/latency_model_fit.py).
# Six rounds, each a fresh session pair (``timing.time_interleaved``): the verdict is a median
# over six placements, as is the final measurement's (``measurement.MEASURE_ROUNDS``), so a
# candidate cannot pass one and fail the other by one unlucky session.
PRECHECK_CAREFUL_ROUNDS = 6
PRECHECK_CALIBRATION_IMAGES = 4


def precheck(
    ctx: SearchContext, student: nn.Module, plan: CompressionPlan, baseline: str | None,
    out_dir: Path, *, careful: bool = False,
) -> Precheck:
    """Size and latency of the structure (cached by structure). ``careful``: always the
    full interleaved look, as the latency model's probes need."""
    key = precheck_key(plan, baseline)
    cached = ctx.precheck_cache.get(key)
    if cached is not None and (cached.careful or not careful):
        return cached
    out_dir.mkdir(parents=True, exist_ok=True)
    # Latency and bytes do not depend on quantization scales: observers and ORT calibrate
    # on a few images only (on a 224x224 resnet18 the full calibration set cost seconds).
    few = [ctx.calibration[0][:PRECHECK_CALIBRATION_IMAGES]]
    path = export_candidate(
        ctx, student, None, plan, baseline, out_dir, name="precheck.onnx", calibration=few
    )
    size = objective_size(ctx.measurement, path)  # the program's bytes for executorch
    options = _session_options(ctx, path)
    inter, careful = _timed(ctx, path, options, size, careful=careful)
    result = Precheck(
        latency=inter.candidate,
        reference=inter.reference,
        ratio=inter.ratio,
        size_bytes=size,
        session_options=options,
        estimate_ms=ctx.budget_latency_ms(inter),
        careful=careful,
    )
    ctx.precheck_cache[key] = result
    if careful:  # a careful look is one of the structure's measurements (pooled_ratio)
        ctx.structure_ratios.setdefault(key, []).append(inter.ratio)
    # The model learns from careful looks only, and not from ORT's own quantizer's file
    # (another export path than ours).
    if careful and baseline in (None, "fp32") and not runtime_quantized(plan):
        features = structure_features(student, plan, ctx.inventory, ctx.task.model)
        ctx.latency_model.observe(key, features, inter.ratio)
    return result


def _session_options(ctx: SearchContext, path: Path) -> dict[str, str]:
    """A choice between two variants (2x apart when it matters): a short interleaved look.
    Files without QDQ nodes run the same either way; an ExecuTorch program has no options."""
    if ctx.measurement.target == executorch_runtime.TARGET or not sessions.has_qdq(path):
        return {}
    options, _ = timing.pick_session_options(
        path, ctx.latency_shape, threads=ctx.measurement.threads, rounds=2, repeats=5,
        target=ctx.measurement.target,
    )
    return options


def _timed(
    ctx: SearchContext, path: Path, options: dict[str, str], size: int, *, careful: bool
) -> tuple[timing.InterleavedLatency, bool]:
    """The file timed against fp32, and whether the look was the careful one. Clear
    verdicts are cheap, close calls get the full measurement: a candidate far over (or far
    under) every latency budget needs no 40 runs to say so."""

    def look(rounds: int, repeats: int) -> timing.InterleavedLatency:
        return timing.time_interleaved(
            path,
            ctx.fp32_onnx,
            ctx.latency_shape,
            threads=ctx.measurement.threads,
            candidate_options=options,
            reference_options={},
            rounds=rounds,
            repeats=repeats,
            target=ctx.measurement.target,
        )

    if careful:
        return look(PRECHECK_CAREFUL_ROUNDS, PRECHECK_REPEATS), True
    inter = look(1, PRECHECK_FIRST_LOOK)
    if clear_verdict(ctx.budgets, ctx.budget_latency_ms(inter), size):
        return inter, False
    return look(PRECHECK_CAREFUL_ROUNDS, PRECHECK_REPEATS), True


def predict_ratio(
    ctx: SearchContext, trial: Any, student: nn.Module, plan: CompressionPlan,
    baseline: str | None,
) -> float | None:
    """The latency model's ratio for this structure, recorded on the trial, when the
    model is fitted, a latency budget exists and the structure was never measured."""
    key = precheck_key(plan, baseline)
    if (baseline is not None or key in ctx.precheck_cache or ctx.budget_ratio() is None
            or runtime_quantized(plan)):
        return None
    features = structure_features(student, plan, ctx.inventory, ctx.task.model)
    predicted = ctx.latency_model.predict(features)
    if predicted is not None:
        trial.set_user_attr(trial_attrs.LATENCY_PREDICTED_VS_FP32, predicted)
    return predicted


def objective_size(settings: MeasurementSettings, path: Path) -> int:
    """The bytes the size objective and size budgets count (the ``size_metric``): of the
    program beside ``path`` for the executorch-xnnpack target."""
    if settings.target == executorch_runtime.TARGET:
        path = executorch_runtime.program_path(path)
    zipped = settings.size_metric == "zip"
    return measure.zipped_size(path) if zipped else measure.file_size(path)


def clear_verdict(budgets: list[Budget], latency_ms: float, size_bytes: float) -> bool:
    """True when a short latency look is enough to judge a structure: a size budget (known
    exactly) is broken, or every latency budget lies more than PRECHECK_CLEAR_MARGIN away."""
    if any(b.kind == "size" and b.violation(latency_ms, size_bytes) > 0 for b in budgets):
        return True
    return all(
        not 1 / PRECHECK_CLEAR_MARGIN < latency_ms / b.value < PRECHECK_CLEAR_MARGIN
        for b in budgets
        if b.kind == "latency"
    )
