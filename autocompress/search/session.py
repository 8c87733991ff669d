"""A search session: task, study, fp32 export and reference, learning rate (what trials need).

Shared by ``search`` (the main job), ``refine`` and ``evaluate_plan``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocompress import __version__, intake
from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.config.options import SearchConfig
from autocompress.config.settings import MeasurementSettings, SearchSettings
from autocompress.errors import AutocompressError, TrainingError, one_line
from autocompress.model import space
from autocompress.model.inventory import as_searched_before
from autocompress.runtime import latency_reference as reference_mod
from autocompress.runtime import scoring, sessions
from autocompress.runtime.latency_reference import ReferenceLatency
from autocompress.search import lrprobe
from autocompress.train import distill
from autocompress.transform import quantize
from autocompress.transform.quantize.executorch_lower import target_inventory
from autocompress.transform.survey import build_inventory
from autocompress.trial import build
from autocompress.trial.context import CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES, SearchContext
from autocompress.trial.runner import TrialRunner

log = logging.getLogger("autocompress")


LR_PROBE_ATTR = "learning_rate_probe"


def resolve_device(device: str) -> str:
    """The fine-tune device a search uses: ``distill.resolve_device`` with a CPU fallback."""
    return str(distill.resolve_device(device, fallback=True))


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest[:16]


@dataclass
class Session:
    """What a search (or a refine) works with once the study is open: plain handles, built
    by ``open_session`` inside the caller's temporary folder and torch-thread scope."""

    study: Any
    runner: TrialRunner
    task: Any
    inventory: Any
    calibration: list[torch.Tensor]
    budgets: list[Budget]
    artifacts: str  # where this run uploads its files
    settings: SearchSettings  # every stage's settings, built once from the config


def open_session(
    config: SearchConfig,
    url: str,
    storage: Any,
    workdir: Path,
    on_start: Callable[[str], None] | None,
    *,
    task: intake.Task | None = None,
) -> Session:
    """Load the task (unless given), open (or create) the study, export and score the fp32
    model, resolve the fp32 latency reference: everything a trial runner needs."""
    budgets = config.parsed_budgets()
    sessions.check_target(config.target)  # a missing GPU or OpenVINO: one line, nothing made
    settings = SearchSettings.from_config(config)
    if task is None:
        task = intake.load_task(
            config.model, config.weights, config.data, num_classes=config.num_classes,
            input_size=config.input_size, seed=config.seed, mean=config.mean, std=config.std,
            task=config.task,
        )
    example = task.data.example_input(1)
    inventory = target_inventory(build_inventory(task.model, example), task.model, config.target)
    inventory = as_searched_before(inventory, study_mod.stored_space(storage, config.study))
    space.check_space(inventory, settings.space)
    description = space.space_description(inventory, settings.space)
    identity = _identity(task, description, budgets, weights=config.weights,
                         objectives=config.objectives, target=config.target)
    # A folder (absolute) or s3://bucket/prefix, recorded in the study for export/dashboard.
    artifacts = study_mod.artifact_location(config.artifacts, url, config.study)
    store = study_mod.artifact_store(artifacts)
    seed_offset = 0 if study_mod.sqlite_path(url) else os.getpid() % 10_000
    study = study_mod.create_or_load_study(storage, config, identity, seed_offset=seed_offset,
                                           space=description)
    fp32_onnx = quantize.export_float_onnx(task.model, example, workdir / "fp32.onnx")
    build.write_reference_program(task, fp32_onnx, config.target, config.latency_batch_size)
    fp32_accuracy = scoring.onnx_accuracy(
        fp32_onnx, task.data.batches("val", 256), threads=config.threads, target=config.target,
        metric=task.metric)
    study_mod.set_study_info(study, _study_info(task, inventory, description, fp32_accuracy,
                                                artifacts, config.to_dict()))
    calibration = _calibration(task, config.seed)
    if on_start:
        on_start(f"study {config.study!r} in {url}: teacher val {task.metric.label} "
                 f"{fp32_accuracy:.4f}, {len(description['layers'])} quantizable layers, "
                 f"{len(description['groups'])} prunable groups")
    reference = _resolve_reference(study, fp32_onnx, task.input_shape, settings.measurement,
                                   on_start)
    # "0.6x" budgets in milliseconds of this machine (re-resolved on a resume elsewhere)
    budgets = [b.resolve(reference.median_ms) for b in budgets]
    study_mod.set_study_info(study, {"budgets": json.dumps([b.to_dict() for b in budgets])})
    ctx = SearchContext(
        reference=reference, task=task, inventory=inventory, space=settings.space,
        training=settings.training, measurement=settings.measurement, budgets=budgets,
        workdir=workdir, fp32_onnx=fp32_onnx, fp32_accuracy=fp32_accuracy,
        device=resolve_device(settings.training.device), calibration=calibration,
        upload=lambda trial, path: study_mod.upload(trial, store, path),
        download=lambda artifact_id, dest: study_mod.download(store, artifact_id, dest),
    )
    return Session(study, TrialRunner(ctx), task, inventory, calibration, budgets, artifacts,
                   settings)


def _identity(
    task: intake.Task, description: dict[str, Any], budgets: list[Budget], *,
    weights: str | None, objectives: tuple[str, ...], target: str,
) -> dict[str, Any]:
    """What a study is of: a resume must match it (``create_or_load_study``)."""
    return {
        "model_spec": task.model_spec,
        "weights_sha256": _file_sha256(weights),
        "data_spec": task.data_spec,
        "objectives": list(objectives),
        "space_hash": space.space_hash(description),
        "budgets": sorted(f"{b.kind}<={b.value:g}{'x' if b.relative else ''}"
                          for b in budgets),
        "onnx_format": quantize.ONNX_FORMAT,
        # one target per study (the best candidate differs between runtimes); absent for the
        # default, so studies made before targets existed still resume
        **({"target": target} if target != sessions.DEFAULT_TARGET else {}),
    }


def _study_info(
    task: intake.Task, inventory: Any, description: dict[str, Any], fp32_accuracy: float,
    artifacts: str, config: dict[str, Any],
) -> dict[str, Any]:
    """What the study records about itself for ``show``, ``export`` and the dashboard."""
    return {
        "model_spec": task.model_spec,
        "data_spec": task.data_spec,
        "objectives": list(config["objectives"]),
        "inventory": json.dumps(inventory.to_dict()),
        "data": json.dumps(task.data.describe()),
        "search_space": json.dumps(description),
        "config": json.dumps(config),
        "input_shape": list(task.input_shape),
        "num_classes": task.num_classes,
        "fp32_accuracy": fp32_accuracy,
        "metric": task.metric.to_dict(),
        "artifacts_dir": artifacts,
        "created_by": f"autocompress {__version__}",
    }


def _calibration(task: intake.Task, seed: int) -> list[torch.Tensor]:
    """The search's calibration set: CALIBRATION_BATCHES shuffled training batches."""
    return [
        x
        for x, _ in _take(
            task.data.batches("train", CALIBRATION_BATCH_SIZE, shuffle=True, seed=seed),
            CALIBRATION_BATCHES,
        )
    ]


def use_learning_rate(
    session: Session, on_start: Callable[[str], None] | None, rate: float | None = None
) -> SearchSettings:
    """Set the session's fine-tune learning rate (the user's, the study's probed one, or a
    new probe; ``rate`` instead when given, a refine's own) on its settings and its runner;
    returns the settings that carry it."""
    runner = session.runner
    settings = _resolve_learning_rate(session.study, session.task, session.inventory,
                                      session.settings, session.calibration, on_start)
    if rate is not None:
        settings = settings.with_learning_rate(rate)
    session.settings = settings
    runner.ctx = dataclasses.replace(runner.ctx, space=settings.space)  # same cache and model
    return settings


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Fine-tuning threads for the search's duration (ONNX Runtime sets its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _take(iterator: Any, n: int) -> list[Any]:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) >= n:
            break
    return out


def _resolve_learning_rate(
    study: Any,
    task: Any,
    inventory: Any,
    settings: SearchSettings,
    calibration: list[torch.Tensor],
    on_start: Callable[[str], None] | None,
) -> SearchSettings:
    """The settings with their fine-tune learning rate set: the user's, else the study's
    probed one (probed once per study, under the study lock so concurrent workers agree)."""
    if settings.space.learning_rate is not None or settings.space.finetune_steps == 0:
        return settings  # given, or nothing will be fine-tuned
    with study_mod.study_lock(study):
        stored = study.user_attrs.get(LR_PROBE_ATTR)
        if stored is None:
            try:
                probe = lrprobe.probe_learning_rate(
                    task, inventory, settings.space, settings.training, calibration,
                    device=resolve_device(settings.training.device),
                    seconds=lrprobe.probe_seconds(settings.run.time_limit),
                )
            except AutocompressError:
                raise
            except Exception as exc:  # the model cannot be fine-tuned as the search would
                raise TrainingError(
                    f"the learning-rate probe (20 fine-tune steps at int8) failed on this "
                    f"model: {one_line(exc, typed=True)}; a model whose forward returns "
                    "something other than a logits tensor needs a task wrapper, and "
                    "--learning-rate skips the probe"
                ) from None
            stored = probe.to_dict()
            study.set_user_attr(LR_PROBE_ATTR, stored)
            note = probe.describe()
        else:
            note = f"learning rate {stored['chosen']:g}, probed when the study began"
    _say(note, on_start)
    return settings.with_learning_rate(float(stored["chosen"]))


def _say(text: str, on_start: Callable[[str], None] | None) -> None:
    if on_start:
        on_start(text)
    else:
        log.info(text)


def _resolve_reference(
    study: Any,
    fp32_onnx: Path,
    input_shape: tuple[int, ...],
    settings: MeasurementSettings,
    on_start: Callable[[str], None] | None,
) -> ReferenceLatency:
    """The study's fp32 latency on this machine: measured once per study and machine (under
    the study lock, so concurrent workers on one machine agree), re-measured and said so
    when the study is resumed elsewhere or with other threads or batch size."""
    info = reference_mod.machine(settings.threads, settings.latency_batch_size)
    key = reference_mod.machine_key(info)
    with study_mod.study_lock(study):
        refs = reference_mod.stored_references(study.user_attrs)
        measured_now = key not in refs
        if measured_now:
            refs[key] = reference_mod.measure_reference(
                fp32_onnx, (settings.latency_batch_size, *input_shape), threads=settings.threads,
                target=settings.target,
            )
            study.set_user_attr(reference_mod.REFERENCE_ATTR, reference_mod.encode_references(refs))
    ref = refs[key]
    others = [r for k, r in refs.items() if k != key]
    _say(reference_mod.resume_note(ref, others, measured_now), on_start)
    return ref
