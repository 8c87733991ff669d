"""The search: intake -> inventory -> study -> baselines -> floors -> optimize.

``run_search(config)`` is what ``autocompress search`` calls. ``--trials N`` means N more
search trials from this worker (baselines come on top, once per study); several workers on
one PostgreSQL study each run their own N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocompress import __version__, intake, lrprobe, quantize, runtime, space
from autocompress import study as study_mod
from autocompress.config import Budget, SearchConfig
from autocompress.errors import BudgetError
from autocompress.inventory import build_inventory
from autocompress.objective import (
    CALIBRATION_BATCH_SIZE,
    CALIBRATION_BATCHES,
    SearchContext,
    TrialRunner,
    build_student,
)
from autocompress.pareto import TrialRecord, pareto_front

log = logging.getLogger("autocompress")

BASELINES = ("fp32", "int8-ptq")
LR_PROBE_ATTR = "learning_rate_probe"
WARM_START_SHARE = 3  # a search needs this many trials per warm start to get them
# A latency budget is called impossible only when it is clearly below the fastest structure
# measured, so machine noise cannot turn a tight-but-possible budget into an error.
_FLOOR_NOISE = 0.8


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    feasible: int
    best_accuracy: float | None
    elapsed_s: float
    last: TrialRecord


@dataclass(frozen=True)
class SearchResult:
    study: str
    storage_url: str
    artifacts_dir: str
    records: list[TrialRecord]
    front: list[TrialRecord]
    fp32: TrialRecord | None
    new_trials: int
    budgets: list[Budget]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda asked but CUDA is not available; fine-tuning on CPU")
        return "cpu"
    return device


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest[:16]


def run_search(
    config: SearchConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> SearchResult:
    url = config.storage_url()
    storage = study_mod.open_storage(url)  # fail fast on a bad URL, before loading models
    # SQLite admits one worker: refuse a second one now, not after loading the model.
    with study_mod.single_sqlite_worker(url):
        return _run_search(config, url, storage, on_progress, on_start)


def _run_search(
    config: SearchConfig,
    url: str,
    storage: Any,
    on_progress: Callable[[Progress], None] | None,
    on_start: Callable[[str], None] | None,
) -> SearchResult:
    budgets = config.parsed_budgets()
    task = intake.load_task(
        config.model,
        config.weights,
        config.data,
        num_classes=config.num_classes,
        input_size=config.input_size,
        seed=config.seed,
    )
    example = task.data.example_input(1)
    inventory = build_inventory(task.model, example)
    space.check_space(inventory, config)
    description = space.space_description(inventory, config)
    identity = {
        "model_spec": task.model_spec,
        "weights_sha256": _file_sha256(config.weights),
        "data_spec": task.data_spec,
        "objectives": list(config.objectives),
        "space_hash": space.space_hash(description),
        "budgets": sorted(f"{b.kind}<={b.value:g}" for b in budgets),
        "onnx_format": quantize.ONNX_FORMAT,
    }
    # A folder (absolute) or s3://bucket/prefix, recorded in the study for export/dashboard.
    artifacts = study_mod.artifact_location(config.artifacts, url, config.study)
    store = study_mod.artifact_store(artifacts)

    with tempfile.TemporaryDirectory(prefix="autocompress-") as tmp, _torch_threads(
        config.train_threads
    ):
        seed_offset = 0 if study_mod.sqlite_path(url) else os.getpid() % 10_000
        study = study_mod.create_or_load_study(
            storage, config, identity, seed_offset=seed_offset
        )
        workdir = Path(tmp)
        fp32_onnx = quantize.export_float_onnx(task.model, example, workdir / "fp32.onnx")
        fp32_accuracy = runtime.onnx_accuracy(
            fp32_onnx, task.data.batches("val", 256), threads=config.threads
        )
        study_mod.set_study_info(study, {
            "model_spec": task.model_spec,
            "data_spec": task.data_spec,
            "budgets": json.dumps([b.to_dict() for b in budgets]),
            "objectives": list(config.objectives),
            "inventory": json.dumps(inventory.to_dict()),
            "data": json.dumps(task.data.describe()),
            "search_space": json.dumps(description),
            "config": json.dumps(config.to_dict()),
            "input_shape": list(task.input_shape),
            "num_classes": task.num_classes,
            "fp32_accuracy": fp32_accuracy,
            "artifacts_dir": artifacts,
            "created_by": f"autocompress {__version__}",
        })
        calibration = [
            x
            for x, _ in _take(
                task.data.batches("train", CALIBRATION_BATCH_SIZE, shuffle=True, seed=config.seed),
                CALIBRATION_BATCHES,
            )
        ]
        if on_start:
            on_start(f"study {config.study!r} in {url}: teacher val accuracy "
                     f"{fp32_accuracy:.4f}, {len(description['layers'])} quantizable layers, "
                     f"{len(description['groups'])} prunable groups")
        ctx = SearchContext(
            task=task,
            inventory=inventory,
            config=config,
            budgets=budgets,
            workdir=workdir,
            fp32_onnx=fp32_onnx,
            fp32_accuracy=fp32_accuracy,
            device=resolve_device(config.device),
            calibration=calibration,
            upload=lambda trial, path: study_mod.upload(trial, store, path),
        )
        runner = TrialRunner(ctx)

        queued = _enqueue_baselines(study, inventory, config)
        total = config.trials + queued
        started = time.perf_counter()
        done = 0

        def callback(study_obj: Any, frozen: Any) -> None:
            nonlocal done
            done += 1
            if on_progress:
                recs = study_mod.records(study_obj)
                feasible = [r for r in recs if r.measured and r.feasible]
                best = max((r.accuracy or 0.0 for r in feasible), default=None)
                on_progress(Progress(done, total, len(feasible), best,
                                     time.perf_counter() - started, study_mod.to_record(frozen)))

        if queued:
            study.optimize(runner, n_trials=queued, callbacks=[callback], catch=(Exception,))
            _check_floors(runner, inventory, config, budgets, study)
        # After the floor check (an impossible budget is refused without waiting for the
        # probe); baselines do not fine-tune, so they never needed the rate.
        config = _resolve_learning_rate(study, task, inventory, config, calibration, on_start)
        runner.ctx = dataclasses.replace(ctx, config=config)  # same pre-check cache
        _enqueue_warm_starts(study, inventory, config)
        study.optimize(runner, n_trials=config.trials, callbacks=[callback], catch=(Exception,))

    recs = study_mod.records(study)
    return SearchResult(
        study=config.study,
        storage_url=url,
        artifacts_dir=artifacts,
        records=recs,
        front=pareto_front(recs, config.objectives),
        fp32=next((r for r in recs if r.baseline == "fp32" and r.measured), None),
        new_trials=done,
        budgets=budgets,
    )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
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


def _enqueue_baselines(study: Any, inventory: Any, config: SearchConfig) -> int:
    """fp32 as exported and uniform int8 PTQ, once per study, so the front always shows what
    the user would get without us. Race-safe: of several workers starting together, one
    queues them (and runs that many extra trials; any worker may pick them up)."""
    if not config.baselines:
        return 0
    baselines = [
        (name, space.plan_to_params(space.uniform_plan(inventory, config, bits=bits),
                                    inventory, config))
        for name, bits in zip(BASELINES, (32, 8), strict=True)
    ]
    return study_mod.enqueue_baselines(study, baselines)


def _resolve_learning_rate(
    study: Any,
    task: Any,
    inventory: Any,
    config: SearchConfig,
    calibration: list[torch.Tensor],
    on_start: Callable[[str], None] | None,
) -> SearchConfig:
    """The config with its fine-tune learning rate set: the user's, else the study's probed
    one (probed once per study, under the study lock so concurrent workers agree)."""
    if config.learning_rate is not None or config.finetune_steps == 0:
        return config  # given, or nothing will be fine-tuned
    with study_mod.study_lock(study):
        stored = study.user_attrs.get(LR_PROBE_ATTR)
        if stored is None:
            probe = lrprobe.probe_learning_rate(
                task, inventory, config, calibration, device=resolve_device(config.device)
            )
            stored = probe.to_dict()
            study.set_user_attr(LR_PROBE_ATTR, stored)
            note = probe.describe()
        else:
            note = f"learning rate {stored['chosen']:g}, probed when the study began"
    if on_start:
        on_start(note)
    else:
        log.info(note)
    return config.replace(learning_rate=float(stored["chosen"]))


def _enqueue_warm_starts(study: Any, inventory: Any, config: SearchConfig) -> int:
    """Uniform QAT + KD at each width below 32 in the space (no pruning), once per study, as
    the first search trials: the recipes a practitioner tries by hand, fine-tuned like every
    candidate, so the front starts from them and the sampler's model from real points. They
    count as search trials; searches too short to spend a third of their trials on them
    (fewer than 3 per warm start) go without."""
    widths = sorted((b for b in config.bits if b < 32), reverse=True)
    if not config.warm_starts or not widths or config.trials < WARM_START_SHARE * len(widths):
        return 0
    named = [
        (f"uniform-int{bits}", space.plan_to_params(
            space.uniform_plan(inventory, config, bits=bits), inventory, config))
        for bits in widths
    ]
    return study_mod.enqueue_once(study, named, "warm_start")


def _check_floors(
    runner: TrialRunner,
    inventory: Any,
    config: SearchConfig,
    budgets: list[Budget],
    study: Any,
) -> None:
    """Refuse a budget no candidate in the space can meet, once the baselines are recorded.

    The floor structures are the most-pruned plans at each allowed width; the fastest and the
    smallest measured among them and the baselines bound what the search can reach.
    """
    if not budgets:
        return
    recs = [r for r in study_mod.records(study) if r.latency_ms is not None]
    best_latency = min((r.latency_ms for r in recs), default=float("inf"))
    best_size = min((r.size_bytes for r in recs if r.size_bytes), default=float("inf"))
    where_latency = where_size = "the baselines"
    ratio = space.prune_high(config)
    for bits in sorted(set(config.bits)):
        plan = space.uniform_plan(inventory, config, bits=bits, ratio=ratio)
        student = build_student(runner.ctx.task, plan, config.round_to)
        pre = runner.precheck(student, plan, None, runner.ctx.workdir / "floors")
        label = f"every group pruned {ratio:.0%} at {bits} bits"
        if pre.latency.median_ms < best_latency:
            best_latency, where_latency = pre.latency.median_ms, label
        if pre.size_bytes < best_size:
            best_size, where_size = pre.size_bytes, label
    for budget in budgets:
        if budget.kind == "latency" and budget.value < best_latency * _FLOOR_NOISE:
            raise BudgetError(
                f"latency budget {budget.text} is below the fastest candidate in the space "
                f"({best_latency:.3g} ms, {where_latency}); raise the budget (baselines are "
                "recorded in the study)"
            )
        if budget.kind == "size" and budget.value < best_size:
            raise BudgetError(
                f"size budget {budget.text} is below the smallest candidate in the space "
                f"({best_size / 1000:.1f} KB, {where_size}); raise the budget"
            )
