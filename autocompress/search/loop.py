"""The search: intake -> inventory -> study -> fp32 reference -> floors -> baselines ->
learning rate -> warm starts -> optimize.

``run_search(config)`` is what ``autocompress search`` calls. ``--trials N`` means N more
fine-tuned search trials from this worker (baselines come on top, once per study); several
workers on one PostgreSQL study each run their own N. Plans rejected at the latency/size
pre-check are recorded as trials too (the sampler learns from them, the dashboard shows
them) but do not use up N; ``max_rejections`` of them in a row end the run with one line
naming the closest plan, and ``time_limit`` (minutes) ends it between trials.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget
from autocompress.config.options import SearchConfig
from autocompress.config.settings import RunSettings, SearchSettings, SpaceSettings
from autocompress.model import space
from autocompress.results.pareto import fp32_record, pareto_front
from autocompress.search import fidelity, planning, student_turns, students
from autocompress.search.counter import TrialCounter, first_trial_estimate
from autocompress.search.floors import check_floors
from autocompress.search.front_queue import FrontQueue, front_queue
from autocompress.search.promote import promote
from autocompress.search.session import (
    LR_PROBE_ATTR,
    Session,
    _say,
    open_session,
    torch_threads,
    use_learning_rate,
)
from autocompress.search.warm_starts import plan_warm_starts
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord
from autocompress.trial.runner import BASELINE_BITS, TrialRunner

log = logging.getLogger("autocompress")


# (name, weight bits of its plan): fp32 as exported, ONNX Runtime's static int8 PTQ and its
# dynamic int8 quantization (MatMulInteger, activations quantized at run time: the guide's
# recipe for Linear-heavy models such as transformers).
BASELINES: tuple[tuple[str, int], ...] = tuple(BASELINE_BITS.items())
# The dynamic baseline only where Linear layers do at least this share of the FLOPs: on
# convolutions ONNX Runtime's ConvInteger ran 6.4x slower than fp32 on the demo CNN and 7x
# on ResNet-20 (scoring its 15,000 CIFAR-10 images took 110 s of a 10-minute search).
DYNAMIC_LINEAR_SHARE = 0.5
LATENCY_MODEL_ATTR = "latency_model"
PROMOTION_PASSES = 3  # under a time limit: plan and run promotions again while time is left


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
    rejected: int = 0  # plans this run rejected before fine-tuning (not counted in trials)
    stop_reason: str | None = None  # why the run ended before its trials, in one line
    metric: str = "accuracy"  # the label of the accuracy objective (neg_mae for a task's MAE)


def run_search(
    config: SearchConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    stop_request: Callable[[], str | None] | None = None,
) -> SearchResult:
    """Run the search ``config`` describes. ``stop_request`` is asked after every trial; a
    one-line reason it returns ends the run there (no promotions after it), finished trials
    kept, and becomes the result's ``stop_reason`` (the service's cancel and fair turns)."""
    url = config.storage_url()
    before = study_mod.storage_snapshot(
        url, config.study, study_mod.artifact_location(config.artifacts, url, config.study))
    storage = study_mod.open_storage(url)  # fail fast on a bad URL, before loading models
    students.check_specs(config.students, config.num_classes)  # a bad --student: one line
    # SQLite admits one worker: refuse a second one now, not after loading the model.
    with study_mod.single_sqlite_worker(url), study_mod.no_half_made_study(before):
        # a bad model, data or budget found from here on leaves no empty study behind
        started = time.perf_counter()  # the time limit counts from here
        with tempfile.TemporaryDirectory(prefix="autocompress-") as tmp, torch_threads(
            config.fine_tune_threads()
        ):
            session = open_session(config, url, storage, Path(tmp), on_start)
            return _run_search(session, url, started, on_progress, on_start, stop_request)


def _run_search(
    session: Session,
    url: str,
    started: float,
    on_progress: Callable[[Progress], None] | None,
    on_start: Callable[[str], None] | None,
    stop_request: Callable[[], str | None] | None = None,
) -> SearchResult:
    study, runner, inventory = session.study, session.runner, session.inventory
    budgets, settings = session.budgets, session.settings
    # --student specs built and checked now: a bad one is one line before any trial runs
    student_models = students.load_models(settings.run.students, session.task)
    if not study.get_trials(deepcopy=False):
        # A new study: refuse an impossible budget from a few pre-checks, before any
        # trial is recorded or fine-tune learning rate probed.
        check_floors(runner, inventory, settings.space, budgets, study)
    queued = _enqueue_baselines(study, inventory, settings.space, settings.run)
    counter = TrialCounter(settings.run, settings.promotion, queued, started)
    counter.stop_request = stop_request
    callback = _ends_on_fatal(runner, _callback(counter, on_progress))
    if queued:
        study.optimize(runner, n_trials=queued, callbacks=[callback], catch=(Exception,))
    if counter.stopped is None:  # asked after each baseline
        # Baselines do not fine-tune, so they never needed the rate.
        settings = use_learning_rate(session, on_start)
        _choose_fidelity(study, runner, settings, counter, on_start)
        bases = students.prepare(session, settings, student_models, counter.elapsed(),
                                 on_start)  # distilled once per study, else loaded
        _enqueue_planned(study, runner, inventory, settings, budgets, on_start)
        if settings.run.warm_starts:
            students.enqueue_starts(study, bases, settings.space, runner)
        counter.first_estimate = first_trial_estimate(
            study_mod.records(study), settings, study.user_attrs.get(LR_PROBE_ATTR),
            calibration=runner.calibration_only is not None)
        proposer = student_turns.turns(study, front_queue(study, runner, settings, on_start),
                                  bases)
        _search_and_promote(study, runner, settings, counter, callback, proposer, on_start)
    stop_reason = counter.end_note(budgets, study_mod.records(study))
    if stop_reason:
        _say(stop_reason, on_start)
    ctx = runner.ctx
    study.set_user_attr(LATENCY_MODEL_ATTR, ctx.latency_model.summary(ctx.budget_ratio()))
    recs = study_mod.records(study)
    return SearchResult(
        study=settings.run.study,
        storage_url=url,
        artifacts_dir=session.artifacts,
        records=recs,
        front=pareto_front(recs, settings.measurement.objectives),
        fp32=fp32_record(recs),
        new_trials=counter.done,
        budgets=budgets,
        rejected=counter.rejected,
        stop_reason=stop_reason,
        metric=ctx.task.metric.label,
    )


def _search_and_promote(
    study: Any, runner: TrialRunner, settings: SearchSettings, counter: TrialCounter,
    callback: Callable[[Any, Any], None], proposer: FrontQueue | student_turns.Turns | None,
    on_start: Callable[[str], None] | None,
) -> None:
    """The search trials (the default sampler's proposals made as each trial starts), then
    the promotions, then, under a time limit, searching again with what is left."""

    def search() -> None:
        counter.searching = True
        study.on_empty_queue = proposer
        try:
            study.optimize(runner, n_trials=counter.hard_cap(), callbacks=[callback],
                           catch=(Exception,))
        finally:
            counter.searching = False
            study.on_empty_queue = None  # promotions are queued, not proposed

    counter.searching = True  # the baselines and probes may have spent the limit already
    if counter.can_finish():
        search()
    counter.searching = False
    for _ in range(PROMOTION_PASSES):  # under a time limit, while their share lasts:
        # a plan retrained once may earn the next rung, the next front member its first
        if counter.stopped or not promote(study, runner, settings, counter, callback,
                                           on_start) or settings.run.time_limit is None:
            break
    if counter.time_left_for_more():
        # promotions did not use all of their share: back to searching until the limit
        counter.last_stretch = True
        search()
    if proposer is not None and proposer.summary():
        _say(str(proposer.summary()), on_start)


def _callback(
    counter: TrialCounter, on_progress: Callable[[Progress], None] | None
) -> Callable[[Any, Any], None]:
    """The study's callback after every trial: count it, report progress, stop the study
    when the run's trials, rejections or time are used up."""

    def callback(study_obj: Any, frozen: Any) -> None:
        record = study_mod.to_record(frozen)
        duration = getattr(frozen, "duration", None)
        counter.add(record, duration.total_seconds() if duration is not None else None)
        if on_progress:
            recs = study_mod.records(study_obj)
            feasible = [r for r in recs if r.measured and r.feasible]
            best = max((r.accuracy or 0.0 for r in feasible), default=None)
            on_progress(Progress(counter.done, counter.total, len(feasible), best,
                                 counter.elapsed(), record))
        if counter.requested_stop() or (counter.searching and counter.should_stop()):
            study_obj.stop()

    return callback


def _ends_on_fatal(
    runner: TrialRunner, callback: Callable[[Any, Any], None]
) -> Callable[[Any, Any], None]:
    """``callback``, then the run's end when the trial just recorded met an error every
    trial would (``TrialRunner.first_fatal``: the teacher's runner or a student's): raised
    here, out of ``study.optimize``, whose ``catch`` keeps every trial's own error inside."""

    def ending(study_obj: Any, frozen: Any) -> None:
        callback(study_obj, frozen)
        fatal = runner.first_fatal()  # the teacher's runner or a --student's
        if fatal is not None:
            raise fatal

    return ending


def _choose_fidelity(study: Any, runner: TrialRunner, settings: SearchSettings,
                     counter: TrialCounter, on_start: Callable[[str], None] | None) -> None:
    """Calibration-only search trials when not one fine-tune fits the time limit
    (``fidelity``): the runner realises them by PTQ, the promotions fine-tune the best."""
    estimate = first_trial_estimate(study_mod.records(study), settings,
                                    study.user_attrs.get(LR_PROBE_ATTR))
    chosen = fidelity.choose(settings, finetune_estimate=estimate, elapsed=counter.elapsed())
    if chosen == fidelity.CALIBRATION:
        runner.calibration_only = fidelity.ptq_method(settings)
        _say(fidelity.note(chosen, finetune_estimate=estimate, settings=settings), on_start)


def _enqueue_planned(
    study: Any,
    runner: TrialRunner,
    inventory: Any,
    settings: SearchSettings,
    budgets: list[Budget],
    on_start: Callable[[str], None] | None,
) -> None:
    """The warm starts and the guided plans, each once per study."""
    recorded = study_mod.records(study)
    # uniform fine-tunes; realised by calibration they would be the PTQ baseline again
    if runner.calibration_only is None and not any(
            r.attrs.get(trial_attrs.WARM_START) for r in recorded):  # once per study: the
        # budget-aware ones cost a few pre-checks each to find their pruning ratio
        warm = plan_warm_starts(runner, inventory, settings.space, settings.run, budgets,
                                recorded)
        for note in warm.notes:
            _say(note, on_start)
        study_mod.enqueue_once(study, warm.named, trial_attrs.WARM_START)
    if settings.run.guided and not any(r.attrs.get(trial_attrs.GUIDED) for r in recorded):
        planning.enqueue_guided(study, runner, inventory, settings.space, settings.run,
                                budgets, on_start)


def linear_share(inventory: Any) -> float:
    """The share of the model's Conv/Linear FLOPs done by Linear layers."""
    weight = [layer for layer in inventory.layers if layer.type in ("Conv1d", "Conv2d",
                                                                   "Conv3d", "Linear")]
    total = sum(layer.flops for layer in weight)
    return sum(layer.flops for layer in weight if layer.type == "Linear") / total if total else 0.0


def _enqueue_baselines(
    study: Any, inventory: Any, settings: SpaceSettings, run: RunSettings
) -> int:
    """fp32 as exported and uniform int8 PTQ (and dynamic int8 for Linear-heavy models),
    once per study, so the front always shows what the user would get without us. Race-safe:
    of several workers starting together, one queues them (and runs that many extra trials;
    any worker may pick them up)."""
    if not run.baselines:
        return 0
    baselines = [
        (name, _baseline_params(bits, inventory, settings))
        for name, bits in BASELINES
        if name != "int8-dynamic" or linear_share(inventory) >= DYNAMIC_LINEAR_SHARE
    ]
    return study_mod.enqueue_baselines(study, baselines)


def _baseline_params(bits: int, inventory: Any, settings: SpaceSettings) -> dict[str, Any]:
    """The params of the uniform plan at ``bits``; at the widest width searched when the
    search does not try ``bits`` (no sampler takes a value outside its choices, and a trial
    without params would leave the multivariate samplers no common space): the runner then
    makes that baseline at ``bits`` (``TrialRunner._plan``)."""
    width = bits if bits in settings.bits else max(settings.bits)
    return space.plan_to_params(space.uniform_plan(inventory, settings, bits=width),
                                inventory, settings)
