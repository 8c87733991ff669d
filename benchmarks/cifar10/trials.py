"""Hand recipes measured exactly as search trials: the package's own TrialRunner on fixed plans.

``make_context`` builds the SearchContext the way ``search.session.open_session`` does (fp32
export, fp32 validation accuracy, 8 calibration batches of 32 training images), and
``run_fixed`` feeds a fixed plan to ``trial.runner.TrialRunner`` through an
``optuna.trial.FixedTrial``: same
build, pre-check, QAT + KD fine-tune, export and measurement code as every search trial, so
recipe and search figures are comparable one to one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from optuna.trial import FixedTrial

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.intake import Task
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import scoring
from autocompress.transform import quantize
from autocompress.transform.survey import build_inventory
from autocompress.trial.context import SearchContext
from autocompress.trial.runner import TrialRunner


def make_context(task: Task, config: SearchConfig, workdir: Path) -> SearchContext:
    workdir.mkdir(parents=True, exist_ok=True)
    example = task.data.example_input(1)
    inventory = build_inventory(task.model, example)
    fp32_onnx = quantize.export_float_onnx(task.model, example, workdir / "fp32.onnx")
    fp32_accuracy = scoring.onnx_accuracy(
        fp32_onnx, task.data.batches("val", 256), threads=config.threads
    )
    calibration = []
    for x, _ in task.data.batches("train", 32, shuffle=True, seed=config.seed):
        calibration.append(x)
        if len(calibration) >= 8:
            break
    settings = SearchSettings.from_config(config)
    return SearchContext(
        task=task,
        inventory=inventory,
        space=settings.space,
        training=settings.training,
        measurement=settings.measurement,
        budgets=config.parsed_budgets(),
        workdir=workdir,
        fp32_onnx=fp32_onnx,
        fp32_accuracy=fp32_accuracy,
        device="cpu",
        calibration=calibration,
        upload=lambda trial, path: "not-uploaded",
    )


def with_config(ctx: SearchContext, config: SearchConfig) -> SearchContext:
    """Same task/exports/calibration, another config (e.g. no fine-tune for PTQ)."""
    settings = SearchSettings.from_config(config)
    return dataclasses.replace(ctx, space=settings.space, training=settings.training,
                               measurement=settings.measurement, budgets=config.parsed_budgets())


def uniform(ctx: SearchContext, *, bits: int, ratio: float = 0.0) -> CompressionPlan:
    return space.uniform_plan(ctx.inventory, ctx.space, bits=bits, ratio=ratio)


def run_fixed(
    ctx: SearchContext, plan: CompressionPlan, *, number: int, baseline: str | None = None
) -> dict[str, Any]:
    """One trial of ``plan`` through TrialRunner; returns its attributes plus duration."""
    params = space.plan_to_params(plan, ctx.inventory, ctx.space)
    trial = FixedTrial(params, number=number)
    if baseline:
        trial.set_user_attr("baseline", baseline)
    started = time.perf_counter()
    error = None
    try:
        TrialRunner(ctx)(trial)
    except Exception as exc:  # recorded, the benchmark goes on with the other recipes
        error = f"{type(exc).__name__}: {exc}"[:300]
    duration = time.perf_counter() - started
    attrs = dict(trial.user_attrs)
    for key in ("timing", "runtime", "weight_types", "constraints"):
        if isinstance(attrs.get(key), str):
            attrs[key] = json.loads(attrs[key])
    attrs.pop("plan", None)
    attrs["duration_s"] = duration
    attrs["error"] = error or attrs.get("fail_reason")
    return attrs
