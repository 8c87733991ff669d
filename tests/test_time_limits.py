"""Time limits hold: a trial (or promotion) that cannot finish inside ``--time-limit`` is not
started, its cost known from the study's own timings, and the run says so in one line.

A 15-minute ResNet-20 search ended after 19.3 minutes (its last trial started late), and a
10-minute resnet18 search started its first search trial past its limit; the passes that
bound themselves by elapsed time are tested in test_sensitivity.py and test_lrprobe.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from search_fixture import run_short_search

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.search.counter import TrialCounter, first_trial_estimate
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def _counter(minutes: float, elapsed_s: float) -> TrialCounter:
    settings = SearchSettings.from_config(SearchConfig(time_limit=minutes, trials=50))
    counter = TrialCounter(settings.run, settings.promotion, 2,
                           time.perf_counter() - elapsed_s)
    counter.searching = True
    counter.last_stretch = True  # the whole limit is the search's (no promotions' share)
    return counter


def _record(number: int, seconds: dict[str, float], **changes: object) -> TrialRecord:
    return TrialRecord(number=number, state="COMPLETE", accuracy=0.9,
                       attrs={trial_attrs.TIMING: json.dumps(seconds)}, **changes)  # type: ignore[arg-type]


def test_a_trial_that_cannot_finish_is_not_started() -> None:
    """One minute, 50 s gone: a trial of 20 s (this run's mean) would end past the limit,
    so the loop stops and the end note says why; one of 5 s still starts."""
    counter = _counter(1.0, 50.0)
    counter.first_estimate = 5.0
    assert counter.can_finish() and not counter.should_stop()
    for seconds in (18.0, 22.0):
        counter.add(TrialRecord(number=9, state="COMPLETE", accuracy=0.9), seconds)
    assert counter.trial_estimate() == pytest.approx(20.0)
    assert counter.should_stop()  # 10 s left, before the search share runs out
    assert counter.declined is not None
    assert "not starting another trial: it would take about 20 s" in counter.declined
    note = counter.end_note([], [])
    assert note is not None and note.startswith("time limit of 1 min reached after 2 of 50")
    assert counter.declined in note and "\n" not in note
    # rejected plans, baselines and promotions do not set the pace of a search trial
    counter.add(TrialRecord(number=10, state="COMPLETE", rejected="too slow"), 0.1)
    counter.add(TrialRecord(number=11, state="COMPLETE", baseline="fp32"), 0.1)
    counter.add(TrialRecord(number=12, state="COMPLETE", accuracy=0.9,
                            attrs={trial_attrs.PARENT: 3}), 90.0)
    assert counter.trial_estimate() == pytest.approx(20.0)


def test_without_a_limit_or_an_estimate_every_trial_starts() -> None:
    settings = SearchSettings.from_config(SearchConfig(trials=3))
    counter = TrialCounter(settings.run, settings.promotion, 2, time.perf_counter() - 1e6)
    counter.first_estimate = 1e9
    assert counter.can_finish() and counter.declined is None
    assert _counter(1.0, 30.0).can_finish()  # no estimate yet: nothing to go by


def test_the_first_estimate_comes_from_the_studys_own_timings() -> None:
    """Before this run finished a trial: the study's earlier search trials, else a
    baseline's fixed part plus the search's fine-tune steps at the probe's pace."""
    settings = SearchSettings.from_config(SearchConfig(finetune_steps=100, time_limit=5.0))
    baselines = [_record(0, {"build": 2.0, "measure": 4.0}, baseline="fp32"),
                 _record(1, {"build": 3.0, "measure": 5.0}, baseline="int8-ptq")]
    probe = {"chosen": 1e-3, "steps": 20, "scores": {"0.001": 0.9, "0.0001": 0.8},
             "seconds": 8.0}  # 0.2 s a step, evaluations included
    assert first_trial_estimate(baselines, settings, probe) == pytest.approx(7.0 + 20.0)
    assert first_trial_estimate(baselines, settings, None) == pytest.approx(7.0)
    assert first_trial_estimate([], settings, probe) == pytest.approx(20.0)
    assert first_trial_estimate([], settings, {"chosen": 1e-3}) is None
    earlier = [*baselines, _record(5, {"build": 2.0, "finetune": 30.0, "measure": 4.0}),
               _record(6, {"build": 2.0, "finetune": 40.0, "measure": 4.0}),
               TrialRecord(number=7, state="COMPLETE", accuracy=0.9, attrs={  # a promotion
                   trial_attrs.PARENT: 5, trial_attrs.TIMING: json.dumps({"finetune": 500.0})})]
    assert first_trial_estimate(earlier, settings, probe) == pytest.approx(41.0)


def test_promotions_that_cannot_finish_are_not_started() -> None:
    """Each promotion pays a trial's fixed part on top of its fine-tune: with 100 s left,
    two retrains of 2 short fine-tunes (10 s fixed + 2 x 30 s each) fit one."""
    counter = _counter(5.0, 200.0)
    steps = counter.promotion.finetune_steps
    timing = {"build": 4.0, "finetune": 30.0, "measure": 6.0}
    assert counter.promotions_that_fit([(timing, steps, 2.0), (timing, steps, 2.0)]) == 1
    assert counter.declined is not None and "1 promotion(s)" in counter.declined
    assert counter.promotions_that_fit([(timing, steps, 1.0)]) == 1
    unlimited = TrialCounter(SearchSettings.from_config(SearchConfig()).run,
                             counter.promotion, 0, time.perf_counter() - 1e6)
    assert unlimited.promotions_that_fit([(timing, steps, 9.0)] * 3) == 3


def test_a_search_with_no_time_left_after_its_baselines_starts_no_trial(
    tmp_path: Path,
) -> None:
    """A 3-second limit on the demo: the baselines spend it, so the first search trial
    (costed from their timings and the probe's pace) is not started, and the run says so."""
    study = run_short_search(tmp_path, time_limit=0.05, trials=3)
    result = study.result
    # the warm starts and guided plans stay queued (WAITING) for the next run
    assert [r for r in result.records if r.baseline is None and r.state != "WAITING"] == []
    assert result.stop_reason is not None
    assert "not starting another trial" in result.stop_reason
    assert result.stop_reason.startswith("time limit of 0.05 min reached after 0 of 3")


def test_a_timed_demo_search_ends_within_a_tenth_of_its_limit(tmp_path: Path) -> None:
    """45 s on the demo, trials of a few seconds: the run (model loading included) ends
    inside its limit plus a tenth, having started no trial it could not finish."""
    started = time.perf_counter()
    study = run_short_search(tmp_path, time_limit=0.75, trials=500)
    took = time.perf_counter() - started
    assert took <= 1.1 * 45.0
    assert any(r.measured and r.baseline is None for r in study.result.records)
    assert study.result.stop_reason is not None
    assert study.result.stop_reason.startswith("time limit of 0.75 min reached")


def test_a_promotion_stretched_to_the_time_left_still_fits_a_moment_later() -> None:
    """The search plans a timed promotion at PROMOTION_PLAN_MARGIN of the effort left: one
    planned at all of it was refused by the fit check made milliseconds later, and a 30-min
    ResNet-20 search ran no promotion ("about 349 s here and 349 s ... left")."""
    from autocompress.search.promote import PROMOTION_PLAN_MARGIN

    config = SearchConfig(time_limit=10.0)
    settings = SearchSettings.from_config(config)
    counter = TrialCounter(settings.run, settings.promotion, baselines=2,
                           started=time.perf_counter() - 300.0)
    timing = {"build": 1.0, "precheck": 0.5, "finetune": 40.0, "export": 0.5, "measure": 8.0}
    steps = config.finetune_steps
    whole = counter.promotion_effort([(timing, steps)])
    time.sleep(0.05)
    assert counter.promotions_that_fit([(timing, steps, whole)]) == 0  # the old plan
    planned = PROMOTION_PLAN_MARGIN * whole
    assert counter.promotions_that_fit([(timing, steps, planned)]) == 1


def test_a_stop_request_ends_the_run_after_the_trial_it_follows(tmp_path: Path) -> None:
    """``run_search(stop_request=...)`` (the service's cancel): asked after every trial, its
    reason ends the run there, with no promotions after it, and is the run's stop reason;
    what was finished stays in the study."""
    from search_fixture import SHORT

    from autocompress.search.loop import run_search

    asked: list[int] = []

    def stop() -> str | None:
        asked.append(1)
        return "cancelled by the job's owner" if len(asked) >= 4 else None

    url = f"sqlite:///{tmp_path / 's.db'}"
    result = run_search(SearchConfig(**{**SHORT, "study": "s", "storage": url, "trials": 6}),
                        stop_request=stop)
    assert result.stop_reason == "cancelled by the job's owner"
    finished = [r for r in result.records if r.state in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(asked) == 4 and len(finished) == 4  # asked once a trial; none ran after
    assert not any(r.attrs.get(trial_attrs.PARENT) is not None for r in result.records)
