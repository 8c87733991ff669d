"""What ``--trials`` counts and when a run of the search stops: the trials it fine-tuned,
the plans rejected in a row, the time limit (with the promotions' share of it), whether the
next trial can finish inside that limit, and the one line that says why a run ended early."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from autocompress.config.budgets import Budget
from autocompress.config.settings import PromotionSettings, RunSettings, SearchSettings
from autocompress.results.pareto import closest_to_budgets
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


class TrialCounter:
    """What ``--trials`` counts (fine-tuned candidates, failures included: they spent the
    work), the rejections in a row that end a hopeless run, and the time limit."""

    def __init__(self, run: RunSettings, promotion: PromotionSettings, baselines: int,
                 started: float) -> None:
        self.run = run
        self.promotion = promotion
        self.baselines = baselines
        self.counted = 0
        self.rejected = 0
        self.in_a_row = 0
        self.finished = 0  # every trial this run finished, baselines included
        self.searching = False  # baselines are done; search trials are being counted
        self.last_stretch = False  # after the promotions: search until the full time limit
        self.started = started
        # seconds each fine-tuned trial of this run took (pre-check rejections excluded: they
        # are cheap, and the next plan may well be fine-tuned)
        self.durations: list[float] = []
        # what a fine-tuned trial is expected to take before this run finished one (from the
        # study's earlier trials, or its baselines and learning-rate probe); None: unknown
        self.first_estimate: float | None = None
        self.declined: str | None = None  # why a trial was not started for lack of time
        # asked after every trial (a service's cancel or its turn for another project): a
        # one-line reason ends the run there, finished trials kept
        self.stop_request: Callable[[], str | None] | None = None
        self.stopped: str | None = None

    def requested_stop(self) -> bool:
        """True once ``stop_request`` gave a reason (kept in ``stopped``)."""
        if self.stopped is None and self.stop_request is not None:
            self.stopped = self.stop_request() or None
        return self.stopped is not None

    @property
    def done(self) -> int:
        return min(self.baselines, self.finished) + self.counted

    @property
    def total(self) -> int:
        return self.baselines + self.run.trials

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def hard_cap(self) -> int:
        """An upper bound on search trials, so the loop ends even if a callback never fires:
        each counted trial can follow at most max_rejections rejections."""
        return (self.run.trials + 1) * (self.run.max_rejections + 1)

    def add(self, record: TrialRecord, seconds: float | None = None) -> None:
        self.finished += 1
        if seconds is not None and record.rejected is None and record.baseline is None and (
                record.attrs.get(trial_attrs.PARENT) is None):
            self.durations.append(seconds)
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
        limit = self.run.time_limit
        share = 0.0 if self.last_stretch else self.promotion.share
        return limit is not None and self.elapsed() >= limit * 60 * (1.0 - share)

    def trial_estimate(self) -> float | None:
        """Seconds the next fine-tuned trial is expected to take: the mean of this run's,
        else the first estimate (None: nothing to go by yet)."""
        if self.durations:
            return sum(self.durations) / len(self.durations)
        return self.first_estimate

    def can_finish(self, seconds: float | None = None, what: str = "another trial") -> bool:
        """Under a time limit: can a ``what`` of ``seconds`` (default: the trial estimate)
        finish inside it? A trial that cannot is not started (a 10-minute resnet18 search
        started its first trial past its limit); ``declined`` says so in one line."""
        limit = self.run.time_limit
        cost = self.trial_estimate() if seconds is None else seconds
        if limit is None or cost is None:
            return True
        left = limit * 60 - self.elapsed()
        if left >= cost:
            return True
        self.declined = (f"not starting {what}: it would take about {_shown(cost)} s here and "
                         f"{_shown(max(left, 0.0))} s of the {limit:g}-min time limit are left")
        return False

    def time_left_for_more(self) -> bool:
        """Under a time limit, after the promotions: is there time for one more trial (the
        mean of this run's trials so far)?"""
        limit = self.run.time_limit
        if limit is None or self.stopped or self.counted >= self.run.trials or self.in_a_row >= (
                self.run.max_rejections) or not self.counted:
            return False
        mean = self.elapsed() / max(self.finished, 1)
        return limit * 60 - self.elapsed() > mean and self.can_finish()

    def promotion_effort(self, timings: Sequence[tuple[dict[str, float], int | None]]) -> float:
        """Short fine-tunes' worth of promotions this run may add: its share of the counted
        trials, or, under a time limit, the time left over what a short fine-tune takes in
        ``timings`` (each a trial's timing and fine-tune steps run), after one trial's fixed
        part (build, export, measurement: a retrain costs it once, however long it trains;
        dividing by the whole short trial left a quarter of the promotions' time to short
        trials that are never retrained)."""
        limit, steps = self.run.time_limit, self.promotion.finetune_steps
        if limit is None:
            return self.promotion.share * self.counted
        tuned = [(t, n) for t, n in timings if t.get("finetune") and n]
        if not tuned or not steps:
            return 0.0
        short = sum(t["finetune"] * steps / n for t, n in tuned) / len(tuned)
        fixed = sum(sum(t.values()) - t["finetune"] for t, _ in tuned) / len(tuned)
        left = limit * 60 - self.elapsed() - fixed
        return max(left, 0.0) / short

    def promotions_that_fit(self, costs: Sequence[tuple[dict[str, float], int | None, float]]
                            ) -> int:
        """How many of the promotions, in order (each its parent's timing and fine-tune
        steps, and its cost in short fine-tunes), finish inside the time limit: each pays
        one trial's fixed part (build, export, measurement) on top of its fine-tune, which
        ``promotion_effort`` counts once for all of them. ``declined`` says why the rest
        were not started."""
        limit, steps = self.run.time_limit, self.promotion.finetune_steps
        if limit is None:
            return len(costs)
        total = 0.0
        for index, (timing, ran, cost) in enumerate(costs):
            if timing.get("finetune") and ran and steps:
                total += (sum(timing.values()) - timing["finetune"]
                          + cost * timing["finetune"] * steps / ran)
            if not self.can_finish(total, what=f"{len(costs) - index} promotion(s)"):
                return index
        return len(costs)

    def should_stop(self) -> bool:
        run = self.run
        return (self.stopped is not None or self.counted >= run.trials
                or self.in_a_row >= run.max_rejections or self._out_of_time()
                or not self.can_finish())

    def end_note(self, budgets: list[Budget], records: list[TrialRecord]) -> str | None:
        """None when the run did its trials; else one line saying why it ended early (with
        the closest plan when rejections ended it)."""
        run = self.run
        if self.stopped:
            return self.stopped
        if self.counted >= run.trials:
            return None
        if self._out_of_time() or self.declined:
            note = (f"time limit of {run.time_limit:g} min reached after {self.counted} of "
                    f"{run.trials} fine-tuned trials ({self.rejected} plans rejected at the "
                    "pre-check)" + (f"; {self.declined}" if self.declined else "")
                    + "; run the same command again to continue the study")
            if budgets and not any(r.measured and r.feasible for r in records):
                # the run ends with nothing to export: say how far the nearest plan is
                closest = _closest(records, budgets)
                note += ("; no trial meets the budgets yet"
                         + (f" ({closest})" if closest else "") + "; or " + _BUDGET_ADVICE)
            return note
        if self.in_a_row >= run.max_rejections:
            head = (f"stopped after {self.in_a_row} plans in a row were rejected at the "
                    f"pre-check ({self.counted} of {run.trials} fine-tuned)")
            closest = _closest([r for r in records if r.rejected is not None], budgets)
            head += f"; {closest}" if closest else ""
            return head + "; " + _BUDGET_ADVICE + ", or --max-rejections to keep trying"
        return None


def _shown(seconds: float) -> str:
    """Seconds as said: one decimal under 10 s (where whole seconds would read as equal)."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _seconds(record: TrialRecord) -> float:
    """A trial's recorded seconds (the sum of its timed phases; 0.0 when none were)."""
    timing = record.json_attr(trial_attrs.TIMING) or {}
    return float(sum(v for v in timing.values() if isinstance(v, (int, float))))


def first_trial_estimate(records: Sequence[TrialRecord], settings: SearchSettings,
                         probe: dict[str, Any] | None, *,
                         calibration: bool = False) -> float | None:
    """Seconds a fine-tuned search trial (``calibration``: a calibration-only one) is
    expected to take before this run finished one: the mean of the study's earlier ones of
    that fidelity, else a baseline's (build, export, measurement and scoring, no fine-tune)
    plus, for a fine-tune, ``finetune_steps`` at the learning-rate probe's pace (its seconds
    over the steps it ran, evaluations included: an estimate on the safe side). None when
    the study holds nothing to go by."""
    searched = [_seconds(r) for r in records if r.measured and r.baseline is None
                and r.attrs.get(trial_attrs.PARENT) is None and _seconds(r) > 0
                and (r.attrs.get(trial_attrs.FIDELITY) == "calibration") == calibration]
    if searched:
        return sum(searched) / len(searched)
    fixed = [_seconds(r) for r in records if r.baseline is not None and _seconds(r) > 0]
    per_step = 0.0 if calibration else probe_step_seconds(probe)
    if not fixed and not per_step:
        return None
    base = sum(fixed) / len(fixed) if fixed else 0.0
    return base + per_step * settings.space.finetune_steps


def probe_step_seconds(probe: dict[str, Any] | None) -> float:
    """Seconds per fine-tune step at the learning-rate probe's pace (0.0: no probe)."""
    if probe and probe.get("seconds") and probe.get("steps") and probe.get("scores"):
        return float(probe["seconds"]) / (int(probe["steps"]) * len(probe["scores"]))
    return 0.0


_BUDGET_ADVICE = "raise the budget, allow more pruning (--prune-max) or fewer bits (--bits)"


def _closest(records: list[TrialRecord], budgets: list[Budget]) -> str:
    """"closest: trial N (plan), what it misses by", or "" when no trial was measured."""
    closest = closest_to_budgets(records, budgets, k=1)
    if not closest:
        return ""
    record, why = closest[0]
    return f"closest: trial {record.number} ({record.plan_summary}), {why}"
