"""Export verification: the written file re-measured (accuracy, model.pt2 agreement, latency).

The file is the one the study measured: ``model.onnx``, or for the executorch-xnnpack target
``model.pte`` (every session of that target opens the program beside the ONNX path)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autocompress import intake
from autocompress.export._results import (
    ACCURACY_TOLERANCE,
    AGREEMENT_FLOOR,
    AGREEMENT_SAMPLES,
    EVAL_BATCH_SIZE,
    LATENCY_RATIO_FACTOR,
    NEAR_TIE,
    VALUE_AGREEMENT,
    VerificationError,
)
from autocompress.export.program import _Context
from autocompress.intake.user_task import metric_of
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import scoring, sessions, timing
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def _runtime_of(record: TrialRecord | None) -> dict[str, Any]:
    value = record.json_attr("runtime") if record is not None else None
    return value if isinstance(value, dict) else {}


def _verify(
    tmp: Path,
    ctx: _Context,
    record: TrialRecord,
    fp32: TrialRecord | None,
    fp32_path: Path | None,
    data: intake.DataSplits,
) -> dict[str, Any]:
    onnx_path = tmp / "model.onnx"
    rt = _runtime_of(record)
    threads = int(rt.get("threads") or ctx.config.get("threads") or 1)
    target = _target_of(rt)
    name = _measured_name(target)

    # 1. accuracy: the same computation the trial recorded (file, split, batches, threads,
    # runtime: the study's deploy target).
    accuracy = scoring.onnx_accuracy(
        onnx_path, data.batches("test", EVAL_BATCH_SIZE), threads=threads,
        session_options=dict(rt.get("session_options") or {}), target=target,
        metric=metric_of(ctx.model_spec),
    )
    recorded = record.test_accuracy
    if recorded is None or abs(accuracy - float(recorded)) > ACCURACY_TOLERANCE:
        version_note = ""
        now = sessions.runtime_info(1, 1, target=target)
        if rt.get("version") and rt["version"] != now.get("version"):
            version_note = (f" ({now['runtime']} {now.get('version')} now, {rt['version']} in "
                            "the search)")
        raise VerificationError(
            f"test accuracy of the written {name} is {accuracy:.6f} but the study recorded "
            f"{recorded} for trial {record.number}{version_note}: same file and data must give "
            "the same figure, so the study record or the runtime changed; pass --no-verify to "
            "export anyway"
        )

    # 2. the PyTorch program against the ONNX file, top-1 on validation samples.
    agreement, near_ties, samples = _agreement(tmp / "model.pt2", onnx_path, data, threads,
                                               target)
    if agreement < AGREEMENT_FLOOR and not record.quantized_by_runtime:
        raise VerificationError(
            f"model.pt2 agrees with {name} on only {agreement:.2%} of {samples} validation "
            f"samples (need {AGREEMENT_FLOOR:.0%}): the rebuilt PyTorch model is not the "
            "exported one; pass --no-verify to export anyway"
        )

    return {
        "file": name,
        "sha256": record.attrs.get(_sha256_attr(target)),  # checked when it was fetched
        "sha256_matches": True,
        "test_accuracy": accuracy,
        "recorded_test_accuracy": recorded,
        "accuracy_tolerance": ACCURACY_TOLERANCE,
        "agreement": agreement,
        "agreement_near_ties": near_ties,  # flips counted as agreement (see NEAR_TIE)
        "agreement_samples": samples,
        "agreement_floor": AGREEMENT_FLOOR,
        "latency": _verify_latency(onnx_path, ctx, record, fp32, fp32_path, threads),
    }


def _measured_name(target: str) -> str:
    """The written file the study's figures are re-measured on."""
    if target == executorch_runtime.TARGET:
        return executorch_runtime.program_path("model.onnx").name
    return "model.onnx"


def _sha256_attr(target: str) -> str:
    """The trial attribute holding the checksum of the file the figures are of."""
    if target == executorch_runtime.TARGET:
        return executorch_runtime.ARTIFACT_SHA256_ATTR
    return trial_attrs.ARTIFACT_SHA256


def _target_of(rt: dict[str, Any]) -> str:
    """The target a trial was measured on (studies made before targets: ONNX Runtime CPU)."""
    return str(rt.get("target") or sessions.DEFAULT_TARGET)


def _agreement(
    program_path: Path, onnx_path: Path, data: intake.DataSplits, threads: int, target: str
) -> tuple[float, float, int]:
    program = torch.export.load(str(program_path)).module()
    batches = []
    taken = 0
    for x, _ in data.batches("val", EVAL_BATCH_SIZE):
        x = x[: AGREEMENT_SAMPLES - taken]
        batches.append(x)
        taken += x.shape[0]
        if taken >= AGREEMENT_SAMPLES:
            break
    onnx_out = scoring.raw_outputs(onnx_path, batches, threads=threads, target=target)
    with torch.no_grad():
        torch_out = torch.cat([program(x) for x in batches]).numpy()
    agreement, near_ties = _agreement_of(onnx_out, torch_out, values=data.targets_are_values)
    return agreement, near_ties, int(taken)


def _agreement_of(onnx_out: Any, torch_out: Any, *, values: bool) -> tuple[float, float]:
    """Share of predictions on which the file and the PyTorch program agree, and the share
    of them that are near-ties: the same top-1 class (per position, for per-pixel logits),
    or a flip that rounding explains (``NEAR_TIE``); for values (float targets) a sample's
    every output within VALUE_AGREEMENT x the standard deviation of the program's outputs."""
    if values:
        scale = max(float(torch_out.std()), 1e-6)
        diff = abs(onnx_out - torch_out).reshape(len(torch_out), -1).max(axis=1)
        return float((diff <= VALUE_AGREEMENT * scale).mean()), 0.0
    onnx_out, torch_out = np.asarray(onnx_out, np.float64), np.asarray(torch_out, np.float64)
    picked = onnx_out.argmax(axis=1)
    same = picked == torch_out.argmax(axis=1)
    with np.errstate(invalid="ignore"):
        gap = torch_out.max(axis=1) - np.take_along_axis(
            torch_out, np.expand_dims(picked, 1), axis=1).squeeze(1)
        spread = torch_out.max(axis=1) - torch_out.min(axis=1)
        diff = np.abs(onnx_out - torch_out).max(axis=1)
    finite = np.isfinite(spread) & np.isfinite(diff)
    typical_diff = float(np.median(diff[finite])) if finite.any() else math.inf
    typical_spread = float(np.median(spread[finite])) if finite.any() else 0.0
    near = np.zeros_like(same)
    if typical_spread > 0 and typical_diff <= NEAR_TIE * typical_spread:
        near = ~same & finite & (gap <= 2 * typical_diff)
    return float((same | near).mean()), float(near.mean())


# The latency check's band around the recorded ratio is [recorded / (1 + t), recorded * (1 + t)]
# with t = LATENCY_FLOOR_TOLERANCE + LATENCY_NOISE_WEIGHT x the measured noise of both figures
# (relative IQRs, see latency_band), at most a factor LATENCY_RATIO_FACTOR. A flat factor of 2
# let a figure 90% off pass (recorded 0.448x, allowed 0.224-0.897x); on a quiet machine the band
# is now about +-20%, and only measured noise widens it.
LATENCY_FLOOR_TOLERANCE = 0.15
LATENCY_NOISE_WEIGHT = 1.0
# Re-measurements before a figure outside its band fails: (rounds, repeats multiplier). The
# second is longer (design rule 7: re-measure longer before calling a noisy figure a failure).
LATENCY_ATTEMPTS = ((3, 1), (6, 2))


def _relative(spread: float | None, median: float | None) -> float:
    """``spread / median``, 0.0 where either is missing or not positive."""
    if spread is None or median is None or not median > 0 or not spread > 0:
        return 0.0
    return float(spread) / float(median)


def latency_band(
    recorded: float, recorded_noise: Sequence[float], measured_noise: Sequence[float]
) -> tuple[tuple[float, float], float, float]:
    """The allowed band for a re-measured latency ratio, its tolerance and the noise behind it.

    ``recorded_noise`` and ``measured_noise`` are relative spreads (IQR / median) of the
    figures behind the recorded ratio and the re-measured one; they add in quadrature. The
    band's half-width (as a factor) is LATENCY_FLOOR_TOLERANCE plus LATENCY_NOISE_WEIGHT x that
    noise, capped at LATENCY_RATIO_FACTOR.
    """
    noise = math.sqrt(sum(float(v) ** 2 for v in (*recorded_noise, *measured_noise)
                          if math.isfinite(v) and v > 0))
    tolerance = min(LATENCY_FLOOR_TOLERANCE + LATENCY_NOISE_WEIGHT * noise,
                    LATENCY_RATIO_FACTOR - 1.0)
    return (recorded / (1.0 + tolerance), recorded * (1.0 + tolerance)), tolerance, noise


def _recorded_noise(record: TrialRecord, fp32: TrialRecord) -> list[float]:
    """Relative IQRs the study recorded for the trial and for its fp32 baseline."""
    return [_relative(record.latency_spread_ms, record.latency_ms),
            _relative(fp32.latency_spread_ms, fp32.latency_ms)]


def _measured_noise(inter: timing.InterleavedLatency) -> list[float]:
    """Relative IQRs of a re-measurement: both sides' runs and the rounds' ratios."""
    return [_relative(inter.candidate.spread_ms, inter.candidate.median_ms),
            _relative(inter.reference.spread_ms, inter.reference.median_ms),
            _relative(inter.ratio_spread, inter.ratio)]


def _tolerance_text(tolerance: float, noise: float) -> str:
    return (f"within a factor {1.0 + tolerance:.3g} of the recorded ratio "
            f"({LATENCY_FLOOR_TOLERANCE:.0%} plus the measured spread of both figures, "
            f"{noise:.1%}; at most a factor {LATENCY_RATIO_FACTOR:g})")


def _verify_latency(
    onnx_path: Path,
    ctx: _Context,
    record: TrialRecord,
    fp32: TrialRecord | None,
    fp32_path: Path | None,
    threads: int,
) -> dict[str, Any]:
    rt = _runtime_of(record)
    recorded = record.latency_vs_fp32
    if fp32 is None or fp32_path is None:
        return {"skipped": "the study has no measured fp32 baseline trial to time against"}
    if recorded is None:
        return {"skipped": "the study recorded no latency ratio for this trial"}
    batch = int(rt.get("batch_size") or ctx.config.get("latency_batch_size") or 1)
    options = dict(rt.get("session_options") or {})
    ref_options = dict(_runtime_of(fp32).get("session_options") or {})
    repeats = max(5, int(ctx.config.get("latency_repeats", 30)) // 3)
    attempts = []
    for rounds, longer in LATENCY_ATTEMPTS:
        inter = timing.time_interleaved(
            onnx_path, fp32_path, (batch, *ctx.input_shape), threads=threads,
            candidate_options=options, reference_options=ref_options,
            rounds=rounds, repeats=repeats * longer, target=_target_of(rt),
        )
        attempts.append(inter.ratio)
        allowed, tolerance, noise = latency_band(recorded, _recorded_noise(record, fp32),
                                                 _measured_noise(inter))
        if allowed[0] <= inter.ratio <= allowed[1]:
            break
    else:
        raise VerificationError(
            f"latency of the written {_measured_name(_target_of(rt))} re-measured at "
            f"{inter.ratio:.3f}x the fp32 "
            f"baseline ({len(attempts)} times, the last {inter.rounds} rounds), but the study "
            f"recorded {recorded:.3f}x; allowed {allowed[0]:.3f}-{allowed[1]:.3f}x "
            f"({_tolerance_text(tolerance, noise)}): this machine's runtime differs from the "
            "search's, or the recorded figure is wrong; re-run the search here or pass "
            "--no-verify"
        )
    return {
        "ratio": inter.ratio,
        "recorded_ratio": recorded,
        "allowed": list(allowed),
        "tolerance": _tolerance_text(tolerance, noise),
        "noise": noise,
        "attempts": attempts,
        "candidate": inter.candidate.to_dict(),
        "fp32": inter.reference.to_dict(),
        "threads": threads,
        "batch_size": batch,
        "session_options": options,
        "fp32_session_options": ref_options,
    }
