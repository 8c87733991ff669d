"""The per-study learning-rate probe on the digits demo."""

from __future__ import annotations

import itertools
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings, SpaceSettings, TrainingSettings
from autocompress.intake import Task
from autocompress.search import lrprobe, session
from autocompress.transform.survey import build_inventory
from tests.search_fixture import run_short_search


def _settings(config: SearchConfig) -> tuple[SpaceSettings, TrainingSettings]:
    """The probe's settings (the space and the fine-tune's) of ``config``."""
    settings = SearchSettings.from_config(config)
    return settings.space, settings.training


def test_choose_takes_the_fastest_rate_that_does_no_harm() -> None:
    assert lrprobe.choose({3e-3: 0.10, 1e-3: 0.70, 3e-4: 0.745, 1e-4: 0.752}) == 3e-4
    assert lrprobe.choose({3e-3: 0.99, 1e-3: 0.99, 3e-4: 0.98}) == 3e-3
    assert lrprobe.choose({3e-3: 0.5, 1e-4: 0.8}, tolerance=0.5) == 3e-3


def _walked(table: dict[float, float], start: float, *, budget: int = 99
             ) -> tuple[list[float], float]:
    """The rates ``walk`` scores, in order, on the default ladder, and the rate chosen."""
    seen: list[float] = []

    def score(lr: float) -> float:
        seen.append(lr)
        return table[lr]

    ladder = tuple(sorted({*lrprobe.CANDIDATES, *lrprobe.BELOW}, reverse=True))
    scores = lrprobe.walk(score, ladder, ladder.index(1e-4), start,
                          lambda: len(seen) >= budget)
    return seen, lrprobe.choose(scores)


def test_the_probe_goes_below_the_grid_while_the_student_still_loses() -> None:
    """MiniLM's sweep at 30 steps: every CNN-grid rate lost accuracy; the walk goes down
    past 1e-4 while it pays and never tries the rates that wreck it."""
    minilm = {3e-3: 0.59, 1e-3: 0.59, 3e-4: 0.711, 1e-4: 0.792, 3e-5: 0.806, 1e-5: 0.807}
    seen, chosen = _walked(minilm, start=0.810)
    assert seen == [1e-4, 3e-5] and chosen == 3e-5


def test_the_probe_goes_up_while_a_faster_rate_does_no_harm() -> None:
    cnn = {3e-3: 0.99, 1e-3: 0.99, 3e-4: 0.98, 1e-4: 0.97, 3e-5: 0.9, 1e-5: 0.9}
    seen, chosen = _walked(cnn, start=0.97)
    assert seen == [1e-4, 3e-4, 1e-3, 3e-3] and chosen == 3e-3
    collapse = {3e-3: 0.1, 1e-3: 0.70, 3e-4: 0.745, 1e-4: 0.752, 3e-5: 0.7, 1e-5: 0.7}
    seen, chosen = _walked(collapse, start=0.74)  # ResNet-20-like: 1e-3 already hurts
    assert seen == [1e-4, 3e-4, 1e-3] and chosen == 3e-4


def test_the_probe_stops_when_its_time_is_up() -> None:
    cnn = {3e-3: 0.99, 1e-3: 0.99, 3e-4: 0.98, 1e-4: 0.97, 3e-5: 0.9, 1e-5: 0.9}
    seen, chosen = _walked(cnn, start=0.97, budget=2)  # unbounded it walks four rates
    assert seen == [1e-4, 3e-4] and chosen == 3e-4
    assert lrprobe.probe_seconds(None) is None
    assert lrprobe.probe_seconds(12) == pytest.approx(72.0)


def test_every_rate_diverged_leaves_the_smallest() -> None:
    """No evidence for a faster rate: the choice is the safest one scored, not the largest."""
    assert lrprobe.choose({3e-3: -math.inf, 1e-3: -math.inf, 1e-4: -math.inf}) == 1e-4


def test_a_bounded_probe_stops_at_its_share_from_the_smallest_on_one_batch(
    demo_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With almost no time the probe scores the grid's smallest rate only and keeps it (the
    safest: it stops at its share and works with what it measured, where it used to score
    a second rate whatever the bound), never walks up into a ``below`` rate above the grid,
    and measures the start on the one batch it timed (each evaluation counted in batches)."""
    finetuned: list[float] = []
    evaluated: list[int] = []
    real_accuracy = lrprobe.torch_accuracy

    def no_finetune(model: object, teacher: object, data: object, plan: object,
                    **kwargs: object) -> None:
        finetuned.append(plan.learning_rate)  # type: ignore[attr-defined]

    def counting(model: object, batches: object, metric: object) -> float:
        held = list(batches)  # type: ignore[call-overload]
        evaluated.append(len(held))
        return real_accuracy(model, held, metric)  # type: ignore[arg-type]

    monkeypatch.setattr(lrprobe.distill, "finetune", no_finetune)
    monkeypatch.setattr(lrprobe, "torch_accuracy", counting)
    config = SearchConfig(finetune_steps=30)
    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    calibration = [x for x, _ in itertools.islice(demo_task.data.batches("train", 32), 2)]
    probe = lrprobe.probe_learning_rate(
        demo_task, inventory, *_settings(config), calibration, candidates=(1e-3, 3e-4, 1e-4),
        below=(3e-3, 3e-5), seconds=1e-6)
    # one timed step, then the smallest rate (nothing trained, so it does no harm), and
    # the time is up after it
    assert finetuned == [1e-4, 1e-4]
    # a step costs more than the whole share: the fewest steps a rate is judged on
    assert probe.steps == lrprobe.MIN_PROBE_STEPS
    assert evaluated == [1, 1]  # the timed start (reused) and the rate, one batch each
    assert set(probe.scores) == {1e-4} and probe.chosen == 1e-4
    assert probe.seconds > 0 and probe.to_dict()["seconds"] == round(probe.seconds, 3)
    finetuned.clear()
    lrprobe.probe_learning_rate(  # unbounded: up through the grid, never to 3e-3 of `below`
        demo_task, inventory, *_settings(config), calibration, candidates=(1e-3, 3e-4, 1e-4),
        below=(3e-3, 3e-5))
    assert finetuned == [1e-4, 3e-4, 1e-3]


def test_probe_refuses_a_rate_that_wrecks_the_student(demo_task: Task) -> None:
    config = SearchConfig(finetune_steps=30)
    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    calibration = [x for x, _ in itertools.islice(demo_task.data.batches("train", 32), 2)]
    probe = lrprobe.probe_learning_rate(
        demo_task, inventory, *_settings(config), calibration, candidates=(5.0, 1e-3), below=()
    )
    assert probe.bits == 8 and probe.steps == 20
    assert probe.start_accuracy > 0.9
    assert probe.scores[5.0] < 0.5 < probe.scores[1e-3]  # 5.0 destroys it, 1e-3 keeps it
    assert probe.chosen == 1e-3
    assert "learning rate 0.001 chosen" in probe.describe()
    assert probe.to_dict()["scores"] == {"5": probe.scores[5.0], "0.001": probe.scores[1e-3]}


def test_probe_fine_tunes_with_the_tasks_own_loss(demo_task: Task) -> None:
    """The probe's rates are judged on the fine-tune the trials will run: a task's own
    hard-target loss, not cross-entropy (it used cross-entropy whatever the task said)."""
    import dataclasses

    import torch.nn.functional as F

    calls: list[int] = []

    def counted(outputs: object, targets: object) -> object:
        calls.append(1)
        return F.cross_entropy(outputs, targets)  # type: ignore[arg-type]

    task = dataclasses.replace(demo_task, loss=counted)
    config = SearchConfig(finetune_steps=30)
    inventory = build_inventory(task.model, task.data.example_input(1))
    calibration = [x for x, _ in itertools.islice(task.data.batches("train", 32), 2)]
    # kd_alpha < 1 in the probe's plan: the hard-target term is part of every step
    probe = lrprobe.probe_learning_rate(task, inventory, *_settings(config), calibration,
                                        candidates=(1e-3,), below=())
    assert probe.steps == 20 and len(calls) == 20


def test_search_probes_once_per_study_and_plans_carry_the_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_short_search(tmp_path, study="lr", trials=1, finetune_steps=5,
                             baselines=False, learning_rate=None)
    from autocompress.api import load_study

    handle = load_study("lr", storage=first.storage_url)
    stored = handle.info.attrs[session.LR_PROBE_ATTR]
    assert stored["chosen"] in (*lrprobe.CANDIDATES, *lrprobe.BELOW)
    plan = first.result.records[0].plan
    assert plan["learning_rate"] == stored["chosen"]

    def no_second_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("the study's probed rate must be reused on resume")

    monkeypatch.setattr(lrprobe, "probe_learning_rate", no_second_probe)
    second = run_short_search(tmp_path, study="lr", trials=1, finetune_steps=5,
                              baselines=False, learning_rate=None)
    assert second.result.records[-1].plan["learning_rate"] == stored["chosen"]


def test_a_given_rate_is_used_as_is(tmp_path: Path) -> None:
    result = run_short_search(tmp_path, study="fixed", trials=1, finetune_steps=5,
                              baselines=False, learning_rate=7e-4)
    assert result.result.records[0].plan["learning_rate"] == 7e-4


def test_ctrl_c_during_the_probe_exits_130_without_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "probe.db"
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from autocompress.cli import main\n"
        "import autocompress.train.distill as d\n"
        "def boom(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "d.finetune = boom\n"
        f"sys.exit(main(['search', '--storage', 'sqlite:///{db}', '--trials', '2']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    con = sqlite3.connect(db)
    # The baselines (no fine-tune) ran before the probe; nothing after them was half-written.
    assert [s for (s,) in con.execute("SELECT state FROM trials")] == ["COMPLETE", "COMPLETE"]
    attrs = [k for (k,) in con.execute("SELECT key FROM study_user_attributes")]
    assert session.LR_PROBE_ATTR not in attrs  # an interrupted probe is not recorded as done


def test_a_probe_that_crashes_is_one_line_naming_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """googlenet's named-tuple outputs crashed the probe with a traceback."""
    import contextlib

    import optuna

    from autocompress.errors import TrainingError
    from autocompress.search import session

    def crash(*args: object, **kwargs: object) -> None:
        raise AttributeError("'GoogLeNetOutputs' object has no attribute 'log_softmax'")

    monkeypatch.setattr(session.lrprobe, "probe_learning_rate", crash)
    monkeypatch.setattr(session.study_mod, "study_lock", lambda study: contextlib.nullcontext())
    study = optuna.create_study()
    with pytest.raises(TrainingError, match=r"learning-rate probe .*GoogLeNetOutputs.*"
                                            r"--learning-rate skips the probe"):
        session._resolve_learning_rate(study, None, None,
                                       SearchSettings.from_config(SearchConfig()), [], None)
