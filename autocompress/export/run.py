"""Export orchestration: choose a trial, write its files and report, verify, publish."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.export._results import FILES, Choice, ExportResult
from autocompress.export.files import _artifacts_dir, _fetch, _publish, _umask, check_out
from autocompress.export.markdown import markdown
from autocompress.export.program import _Context, _export_program, _rebuild
from autocompress.export.report import _plot, _report
from autocompress.export.selection import base_context, choose_from_study, fp32_record
from autocompress.export.verify import _verify
from autocompress.intake.metric import label_of
from autocompress.intake.models import zeros_input
from autocompress.intake.sample_inputs import inputs_record
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import measure
from autocompress.study.records import TrialRecord
from autocompress.transform.survey import build_inventory


def export_from_storage(
    url: str,
    study_name: str,
    *,
    out: str | Path,
    trial: int | None = None,
    best: bool = False,
    budgets: Sequence[str] = (),
    max_accuracy_drop: str | float | None = None,
    force: bool = False,
    verify: bool = True,
    artifacts_dir: str | Path | None = None,
    rule: str | None = None,
) -> ExportResult:
    """Choose a trial of a stored study, write its files to ``out`` and verify them.

    Raises ExportError (CLI exit 2, one line) for an unknown or unfinished trial, nothing
    within the limits, a non-empty ``out`` without ``force``, a missing or corrupted
    artifact, and VerificationError when the written file does not reproduce the study's
    figures. On any error nothing is left in ``out``.
    """
    out_path = Path(out).expanduser().absolute()
    check_out(out_path, force)
    study = study_mod.load_existing_study(url, study_name)
    info = study_mod.study_info(study, url)
    records = study_mod.records(study)
    fp32 = fp32_record(records)
    choice = choose_from_study(study, info, trial=trial, best=best, budgets=budgets,
                               max_accuracy_drop=max_accuracy_drop, records=records)
    if rule is not None:
        choice = dataclasses.replace(choice, rule=rule)
    store = study_mod.artifact_store(_artifacts_dir(info, url, artifacts_dir))
    ctx = base_context(_Context.from_info(info), choice.record, records)  # teacher or student

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial",
                                dir=out_path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result is a normal folder
    try:
        with tempfile.TemporaryDirectory(prefix="autocompress-export-") as scratch:
            report = _write(tmp, Path(scratch), store, ctx, choice, records, fp32, verify)
        names = [*FILES, *_target_files(tmp, choice.record, ctx.input_shape)]
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": measure.sha256_file(tmp / name)}
            for name in names
        }
        _publish(tmp, out_path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        study=study_name,
        storage_url=url,
        trial=choice.record.number,
        out=out_path,
        rule=choice.rule,
        files=files,
        report=report,
        metric=label_of(info.attrs.get("metric")),
    )


def _write(
    tmp: Path,
    scratch: Path,
    store: Any,
    ctx: _Context,
    choice: Choice,
    records: list[TrialRecord],
    fp32: TrialRecord | None,
    verify: bool,
) -> dict[str, Any]:
    record = choice.record
    onnx_path = tmp / "model.onnx"
    _fetch(store, record, "artifact_id", "artifact_sha256", onnx_path, "ONNX artifact")
    state_path = scratch / "state.pt"
    _fetch(store, record, "torch_artifact_id", "torch_artifact_sha256", state_path,
           "PyTorch artifact")
    program = _is_program_target(record)
    if program:  # the program the study measured, beside model.onnx (model.pte)
        _fetch(store, record, executorch_runtime.ARTIFACT_ID_ATTR,
               executorch_runtime.ARTIFACT_SHA256_ATTR,
               executorch_runtime.program_path(onnx_path), "ExecuTorch program")
    fp32_path: Path | None = None
    if verify and fp32 is not None:
        fp32_path = scratch / "fp32.onnx"
        _fetch(store, fp32, "artifact_id", "artifact_sha256", fp32_path, "fp32 ONNX artifact")
        if program:
            _fetch(store, fp32, executorch_runtime.ARTIFACT_ID_ATTR,
                   executorch_runtime.ARTIFACT_SHA256_ATTR,
                   executorch_runtime.program_path(fp32_path), "fp32 ExecuTorch program")
    data = ctx.load_checked_data() if verify else None
    model, float_model = _rebuild(ctx, record, state_path)
    example = (data.example_input(2) if data is not None
               else zeros_input(model, (2, *ctx.input_shape)))
    program_diff = _export_program(model, example, tmp / "model.pt2")
    plan = CompressionPlan.from_dict(record.plan)
    (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    after = build_inventory(float_model, example[:1])

    verification = None
    if verify and data is not None:
        verification = _verify(tmp, ctx, record, fp32, fp32_path, data)
        verification["program_max_abs_diff"] = program_diff

    report = _report(ctx, choice, record, fp32, plan, after, verification, program_diff,
                     inputs_record(float_model, ctx.input_shape, example.dtype))
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "report.md").write_text(markdown(report))
    _plot(tmp / "pareto.png", records, record, ctx, choice.budgets or _study_budgets(ctx))
    return report


def _is_program_target(record: TrialRecord) -> bool:
    """Whether the trial was measured as an ExecuTorch program (executorch-xnnpack)."""
    runtime_info = record.json_attr("runtime")
    target = runtime_info.get("target") if isinstance(runtime_info, dict) else None
    return target == executorch_runtime.TARGET


def _target_files(folder: Path, record: TrialRecord, input_shape: tuple[int, ...]) -> list[str]:
    """Files in the study's target's own format beside model.onnx: OpenVINO IR for the
    openvino-cpu target, what OpenVINO deployments load fastest; for the tensorrt target the
    engine TensorRT built from model.onnx for this GPU, with its builder flags
    (``tensorrt/build.json``); for executorch-xnnpack the measured program itself,
    ``model.pte`` (fetched and checksummed in ``_write``, verified in ``_verify``)."""
    if _is_program_target(record):
        return [executorch_runtime.program_path(folder / "model.onnx").name]
    runtime_info = record.json_attr("runtime")
    target = runtime_info.get("target") if isinstance(runtime_info, dict) else None
    if target == "tensorrt":
        from autocompress.runtime import tensorrt as tensorrt_engine
        from autocompress.runtime.sessions import has_qdq

        onnx_path = folder / "model.onnx"
        return tensorrt_engine.save_engine(onnx_path, folder, input_shape,
                                           qdq=has_qdq(onnx_path))
    if target != "openvino-cpu":
        return []
    from autocompress.runtime import openvino as openvino_runtime

    written = openvino_runtime.save_ir(folder / "model.onnx", folder / "model.xml")
    return [p.name for p in written]


def _study_budgets(ctx: _Context) -> list[Budget]:
    return [Budget.from_dict(b) for b in ctx.info.json_attr("budgets", []) or []]
