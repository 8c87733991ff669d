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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress import study as study_mod
from autocompress.config.options import Budget, SearchConfig
from autocompress.errors import BudgetError
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.results.pareto import closest_to_budgets, fp32_record, pareto_front
from autocompress.runtime import measure
from autocompress.search import planning
from autocompress.search.promotion import plan_promotions
from autocompress.search.session import _say, open_session, torch_threads, use_learning_rate
from autocompress.search.warm_starts import plan_warm_starts
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord
from autocompress.trial.runner import TrialRunner, build_student

log = logging.getLogger("autocompress")


# (name, weight bits of its plan): fp32 as exported, ONNX Runtime's static int8 PTQ and its
# dynamic int8 quantization (MatMulInteger, activations quantized at run time: the guide's
# recipe for Linear-heavy models such as transformers).
BASELINES = (("fp32", 32), ("int8-ptq", 8), ("int8-dynamic", 8))
# The dynamic baseline only where Linear layers do at least this share of the FLOPs: on
# convolutions ONNX Runtime's ConvInteger ran 6.4x slower than fp32 on the demo CNN and 7x
# on ResNet-20 (scoring its 15,000 CIFAR-10 images took 110 s of a 10-minute search).
DYNAMIC_LINEAR_SHARE = 0.5
LATENCY_MODEL_ATTR = "latency_model"
PROMOTION_PASSES = 3  # under a time limit: plan and run promotions again while time is left


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
    rejected: int = 0  # plans this run rejected before fine-tuning (not counted in trials)
    stop_reason: str | None = None  # why the run ended before its trials, in one line
    metric: str = "accuracy"  # the label of the accuracy objective (neg_mae for a task's MAE)


def run_search(
    config: SearchConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> SearchResult:
    url = config.storage_url()
    before = study_mod.storage_snapshot(
        url, config.study, study_mod.artifact_location(config.artifacts, url, config.study))
    storage = study_mod.open_storage(url)  # fail fast on a bad URL, before loading models
    # SQLite admits one worker: refuse a second one now, not after loading the model.
    with study_mod.single_sqlite_worker(url), study_mod.no_half_made_study(before):
        # a bad model, data or budget found from here on leaves no empty study behind
        return _run_search(config, url, storage, on_progress, on_start)


def _run_search(
    config: SearchConfig,
    url: str,
    storage: Any,
    on_progress: Callable[[Progress], None] | None,
    on_start: Callable[[str], None] | None,
) -> SearchResult:
    started = time.perf_counter()  # the time limit counts from here
    with tempfile.TemporaryDirectory(prefix="autocompress-") as tmp, torch_threads(
        config.train_threads
    ):
        session = open_session(config, url, storage, Path(tmp), on_start)
        study, runner, inventory = session.study, session.runner, session.inventory
        budgets = session.budgets
        artifacts = session.artifacts

        if not study.get_trials(deepcopy=False):
            # A new study: refuse an impossible budget from a few pre-checks, before any
            # trial is recorded or fine-tune learning rate probed.
            _check_floors(runner, inventory, config, budgets, study)
        queued = _enqueue_baselines(study, inventory, config)
        counter = _TrialCounter(config, queued, started)

        def callback(study_obj: Any, frozen: Any) -> None:
            record = study_mod.to_record(frozen)
            counter.add(record)
            if on_progress:
                recs = study_mod.records(study_obj)
                feasible = [r for r in recs if r.measured and r.feasible]
                best = max((r.accuracy or 0.0 for r in feasible), default=None)
                on_progress(Progress(counter.done, counter.total, len(feasible), best,
                                     counter.elapsed(), record))
            if counter.searching and counter.should_stop():
                study_obj.stop()

        if queued:
            study.optimize(runner, n_trials=queued, callbacks=[callback], catch=(Exception,))
        # Baselines do not fine-tune, so they never needed the rate.
        config = use_learning_rate(session, on_start)
        ctx = runner.ctx
        recorded = study_mod.records(study)
        if not any(r.attrs.get(trial_attrs.WARM_START) for r in recorded):  # once per study: the
            # budget-aware ones cost a few pre-checks each to find their pruning ratio
            warm = plan_warm_starts(runner, inventory, config, budgets, recorded)
            for note in warm.notes:
                _say(note, on_start)
            study_mod.enqueue_once(study, warm.named, trial_attrs.WARM_START)
        if config.guided and not any(r.attrs.get(trial_attrs.GUIDED) for r in recorded):
            planning.enqueue_guided(study, runner, inventory, config, budgets, on_start)
        counter.searching = True
        study.optimize(runner, n_trials=counter.hard_cap(), callbacks=[callback],
                       catch=(Exception,))
        counter.searching = False
        for _ in range(PROMOTION_PASSES):  # under a time limit, while their share lasts:
            # a plan retrained once may earn the next rung, the next front member its first
            if not _promote(study, runner, config, counter, callback, on_start) or (
                    config.time_limit is None):
                break
        if counter.time_left_for_more():
            # promotions did not use all of their share: back to searching until the limit
            counter.searching = counter.last_stretch = True
            study.optimize(runner, n_trials=counter.hard_cap(), callbacks=[callback],
                           catch=(Exception,))
        stop_reason = counter.end_note(budgets, study_mod.records(study))
        if stop_reason:
            _say(stop_reason, on_start)
        study.set_user_attr(LATENCY_MODEL_ATTR, ctx.latency_model.summary(ctx.budget_ratio()))
        metric = ctx.task.metric.label

    recs = study_mod.records(study)
    return SearchResult(
        study=config.study,
        storage_url=url,
        artifacts_dir=artifacts,
        records=recs,
        front=pareto_front(recs, config.objectives),
        fp32=fp32_record(recs),
        new_trials=counter.done,
        budgets=budgets,
        rejected=counter.rejected,
        stop_reason=stop_reason,
        metric=metric,
    )


class _TrialCounter:
    """What ``--trials`` counts (fine-tuned candidates, failures included: they spent the
    work), the rejections in a row that end a hopeless run, and the time limit."""

    def __init__(self, config: SearchConfig, baselines: int, started: float) -> None:
        self.config = config
        self.baselines = baselines
        self.counted = 0
        self.rejected = 0
        self.in_a_row = 0
        self.finished = 0  # every trial this run finished, baselines included
        self.searching = False  # baselines are done; search trials are being counted
        self.last_stretch = False  # after the promotions: search until the full time limit
        self.started = started

    @property
    def done(self) -> int:
        return min(self.baselines, self.finished) + self.counted

    @property
    def total(self) -> int:
        return self.baselines + self.config.trials

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def hard_cap(self) -> int:
        """An upper bound on search trials, so the loop ends even if a callback never fires:
        each counted trial can follow at most max_rejections rejections."""
        return (self.config.trials + 1) * (self.config.max_rejections + 1)

    def add(self, record: TrialRecord) -> None:
        self.finished += 1
        if not self.searching:
            return
        if record.rejected is not None:
            self.rejected += 1
            self.in_a_row += 1
        else:
            self.counted += 1
            self.in_a_row = 0

    def _out_of_time(self) -> bool:
        """Past the search part of the time limit (the rest is the promotions' share, and
        after them, the last stretch of searching)."""
        limit = self.config.time_limit
        share = 0.0 if self.last_stretch else self.config.promotion_share()
        return limit is not None and self.elapsed() >= limit * 60 * (1.0 - share)

    def time_left_for_more(self) -> bool:
        """Under a time limit, after the promotions: is there time for one more trial (the
        mean of this run's trials so far)?"""
        limit = self.config.time_limit
        if limit is None or self.counted >= self.config.trials or self.in_a_row >= (
                self.config.max_rejections) or not self.counted:
            return False
        mean = self.elapsed() / max(self.finished, 1)
        return limit * 60 - self.elapsed() > mean

    def promotion_effort(self, timings: Sequence[tuple[dict[str, float], int | None]]) -> float:
        """Short fine-tunes' worth of promotions this run may add: its share of the counted
        trials, or, under a time limit, the time left over what a short fine-tune takes in
        ``timings`` (each a trial's timing and fine-tune steps run), after one trial's fixed
        part (build, export, measurement: a retrain costs it once, however long it trains;
        dividing by the whole short trial left a quarter of the promotions' time to short
        trials that are never retrained)."""
        cfg = self.config
        if cfg.time_limit is None:
            return cfg.promotion_share() * self.counted
        tuned = [(t, n) for t, n in timings if t.get("finetune") and n]
        if not tuned or not cfg.finetune_steps:
            return 0.0
        short = sum(t["finetune"] * cfg.finetune_steps / n for t, n in tuned) / len(tuned)
        fixed = sum(sum(t.values()) - t["finetune"] for t, _ in tuned) / len(tuned)
        left = cfg.time_limit * 60 - self.elapsed() - fixed
        return max(left, 0.0) / short

    def should_stop(self) -> bool:
        cfg = self.config
        return (self.counted >= cfg.trials or self.in_a_row >= cfg.max_rejections
                or self._out_of_time())

    def end_note(self, budgets: list[Budget], records: list[TrialRecord]) -> str | None:
        """None when the run did its trials; else one line saying why it ended early (with
        the closest plan when rejections ended it)."""
        cfg = self.config
        if self.counted >= cfg.trials:
            return None
        if self._out_of_time():
            note = (f"time limit of {cfg.time_limit:g} min reached after {self.counted} of "
                    f"{cfg.trials} fine-tuned trials ({self.rejected} plans rejected at the "
                    "pre-check); run the same command again to continue the study")
            if budgets and not any(r.measured and r.feasible for r in records):
                # the run ends with nothing to export: say how far the nearest plan is
                closest = _closest(records, budgets)
                note += ("; no trial meets the budgets yet"
                         + (f" ({closest})" if closest else "") + "; or " + _BUDGET_ADVICE)
            return note
        if self.in_a_row >= cfg.max_rejections:
            head = (f"stopped after {self.in_a_row} plans in a row were rejected at the "
                    f"pre-check ({self.counted} of {cfg.trials} fine-tuned)")
            closest = _closest([r for r in records if r.rejected is not None], budgets)
            head += f"; {closest}" if closest else ""
            return head + "; " + _BUDGET_ADVICE + ", or --max-rejections to keep trying"
        return None


_BUDGET_ADVICE = "raise the budget, allow more pruning (--prune-max) or fewer bits (--bits)"


def _closest(records: list[TrialRecord], budgets: list[Budget]) -> str:
    """"closest: trial N (plan), what it misses by", or "" when no trial was measured."""
    closest = closest_to_budgets(records, budgets, k=1)
    if not closest:
        return ""
    record, why = closest[0]
    return f"closest: trial {record.number} ({record.plan_summary}), {why}"


def linear_share(inventory: Any) -> float:
    """The share of the model's Conv/Linear FLOPs done by Linear layers."""
    weight = [layer for layer in inventory.layers if layer.type in ("Conv1d", "Conv2d",
                                                                   "Conv3d", "Linear")]
    total = sum(layer.flops for layer in weight)
    return sum(layer.flops for layer in weight if layer.type == "Linear") / total if total else 0.0


def _enqueue_baselines(study: Any, inventory: Any, config: SearchConfig) -> int:
    """fp32 as exported and uniform int8 PTQ (and dynamic int8 for Linear-heavy models),
    once per study, so the front always shows what the user would get without us. Race-safe:
    of several workers starting together, one queues them (and runs that many extra trials;
    any worker may pick them up)."""
    if not config.baselines:
        return 0
    baselines = [
        (name, space.plan_to_params(space.uniform_plan(inventory, config, bits=bits),
                                    inventory, config))
        for name, bits in BASELINES
        if name != "int8-dynamic" or linear_share(inventory) >= DYNAMIC_LINEAR_SHARE
    ]
    return study_mod.enqueue_baselines(study, baselines)


def _promote(
    study: Any,
    runner: TrialRunner,
    config: SearchConfig,
    counter: _TrialCounter,
    callback: Callable[[Any, Any], None],
    on_start: Callable[[str], None] | None,
) -> bool:
    """Retrain the front's most valuable plans longer (see ``promotion``), as linked trials;
    False when none was chosen."""
    reference_size = 1.1 * measure.file_size(runner.ctx.fp32_onnx)
    with study_mod.study_lock(study):  # two workers never promote the same plan
        recs = study_mod.records(study)
        by_number = {r.number: r for r in recs}
        short = [r for r in recs if r.measured and r.baseline is None
                 and r.attrs.get(trial_attrs.TIMING) and r.attrs.get(trial_attrs.PARENT) is None]
        chosen = plan_promotions(recs, config, effort=counter.promotion_effort(
            [_timing(r) for r in short]), reference_size=reference_size,
            stretch=config.time_limit is not None)
        if chosen and config.time_limit is not None:
            # The first retrain takes most of the time: cost it at its own plan's speed
            # (int8 QAT steps ran 0.33 s where the mean short trial's ran 0.24 s, and a
            # retrain costed at the mean ran a 15-minute search 3 minutes past its limit).
            own = counter.promotion_effort([_timing(by_number[chosen[0].parent])])
            if own > 0:
                chosen = plan_promotions(recs, config, effort=own,
                                         reference_size=reference_size, stretch=True)
        for p in chosen:
            parent = by_number[p.parent]
            plan = space.as_qat(CompressionPlan.from_dict(parent.plan))
            params = space.plan_to_params(plan, runner.ctx.inventory, config)
            study_mod.enqueue(study, params, {trial_attrs.PARENT: p.parent,
                                              trial_attrs.FINETUNE_STEPS: p.steps,
                                              trial_attrs.PROMOTION_RUNG: p.rung}, first=True)
    if not chosen:
        return False
    _say(f"promoting {len(chosen)} plan(s) to longer fine-tunes: "
         + ", ".join(f"#{p.parent} -> {p.steps} steps" for p in chosen), on_start)
    study.optimize(runner, n_trials=len(chosen), callbacks=[callback], catch=(Exception,))
    return True


def _timing(record: TrialRecord) -> tuple[dict[str, float], int | None]:
    """A trial's timing (seconds per stage) and the fine-tune steps it ran."""
    steps = record.attrs.get(trial_attrs.FINETUNE_STEPS_RUN)
    return record.json_attr(trial_attrs.TIMING) or {}, int(steps) if steps else None


def _check_floors(
    runner: TrialRunner,
    inventory: Any,
    config: SearchConfig,
    budgets: list[Budget],
    study: Any,
) -> None:
    """Refuse a budget no candidate in the space can meet, before any trial is recorded.

    The floor structures are the most-pruned plans at each allowed width (and activation
    choice); the fastest and the smallest of them (and of any trial already recorded) bound
    what the search can reach. The size limit quoted is the smallest file's bytes and, below
    it, the packing limit (parameters x bits) no file can go under.
    """
    if not budgets:
        return
    recs = [r for r in study_mod.records(study) if r.budget_latency_ms is not None]
    best_latency = min((r.budget_latency_ms or 0.0 for r in recs), default=float("inf"))
    best_size = min((r.size_bytes for r in recs if r.size_bytes), default=float("inf"))
    where_latency = where_size = "the trials recorded"
    packing = float("inf")
    ratio = space.prune_high(config)
    for bits in sorted(set(config.bits)):
        for acts in (config.activation_bits if bits < 32 else config.activation_bits[:1]):
            plan = space.uniform_plan(inventory, config, bits=bits, ratio=ratio,
                                      activation_bits=acts)
            student = build_student(runner.ctx.task, plan, config.round_to)
            pre = runner.precheck(student, plan, None, runner.ctx.workdir / "floors")
            label = f"every group pruned {ratio:.0%} at {bits} bits" + (
                " weight-only" if bits < 32 and acts == 32 else "")
            if pre.estimate_ms < best_latency:
                best_latency, where_latency = pre.estimate_ms, label
            if pre.size_bytes < best_size:
                best_size, where_size = pre.size_bytes, label
                packing = measure.packing_limit_bytes(student, plan)
    for budget in budgets:
        if budget.kind == "latency" and budget.value < best_latency * _FLOOR_NOISE:
            ref = runner.ctx.reference
            ratios = "" if ref is None else (
                f" = x{best_latency / ref.median_ms:.2f} of the fp32 reference "
                f"{ref.median_ms:.3g} ms; the budget needs x{budget.value / ref.median_ms:.2f}")
            raise BudgetError(
                f"latency budget {budget.shown()} is below the fastest candidate in the space "
                f"({best_latency:.3g} ms, {where_latency}{ratios}); raise the budget "
                "(nothing was recorded)"
            )
        if budget.kind == "size" and budget.value < best_size:
            limit = "" if packing == float("inf") else (
                f"; its packing limit, parameters x bits, is {packing / 1000:.1f} KB")
            raise BudgetError(
                f"size budget {budget.text} is below the smallest candidate in the space "
                f"({best_size / 1000:.1f} KB, {where_size}{limit}); raise the budget "
                "(nothing was recorded)"
            )
