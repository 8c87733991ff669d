"""``--student``: a tinier CNN distilled from the digits demo teacher once per study, then
compressed beside it (plans keyed by its own layer names), refined and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocompress import cli
from autocompress.export import export_from_storage
from autocompress.search.refine import RefineError, refine_trial
from autocompress.search.students import param_prefix
from autocompress.study import attrs as trial_attrs
from autocompress.study import load_existing_study, records
from autocompress.study.records import TrialRecord
from tests.search_fixture import ShortStudy, run_short_search

SPEC = "tests.student_models:tiny_student"
EPOCHS = 4


@pytest.fixture(scope="module")
def student_study(tmp_path_factory: pytest.TempPathFactory) -> ShortStudy:
    # no guided pass: the search trials alternate teacher (TPE) and student turns
    return run_short_search(tmp_path_factory.mktemp("student"), study="st", trials=4,
                            finetune_steps=20, guided=False, students=(SPEC,),
                            student_epochs=EPOCHS, promote_share=0.0)


def _distilled(recs: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in recs if r.attrs.get(trial_attrs.STUDENT_DISTILLED) == SPEC]


def _student_trials(recs: list[TrialRecord]) -> list[TrialRecord]:
    return [r for r in recs if r.base_model == SPEC and r not in _distilled(recs)]


def _student_layers() -> set[str]:
    from tests.student_models import tiny_student

    return {name for name, m in tiny_student().named_modules()
            if type(m).__name__ in ("Conv2d", "Linear")}


def test_student_is_distilled_and_linked_to_the_teacher(student_study: ShortStudy) -> None:
    recs = student_study.result.records
    distilled = _distilled(recs)
    assert len(distilled) == 1
    d = distilled[0]
    assert d.measured and d.base_model == SPEC
    assert d.attrs[trial_attrs.STUDENT_OF] == "teacher"
    assert d.attrs[trial_attrs.STUDENT_EPOCHS] == EPOCHS
    # stage outputs paired by resolution: 8x8 and 4x4
    assert json.loads(d.attrs[trial_attrs.STUDENT_PAIRING]) == [["stage1", "block1"],
                                                               ["stage2", "block2"]]
    assert d.attrs[trial_attrs.STUDENT_WEIGHTS_ID]
    assert set(d.plan["bits"]) == _student_layers()
    fp32 = student_study.result.fp32
    assert fp32 is not None and d.size_bytes is not None and fp32.size_bytes is not None
    assert d.size_bytes < fp32.size_bytes / 3  # its own fp32 file, the teacher's is larger
    assert d.accuracy is not None and d.accuracy > 0.3  # learned (chance: 0.1)


def test_student_trials_are_keyed_by_its_layer_names(student_study: ShortStudy) -> None:
    recs = student_study.result.records
    mine = [r for r in _student_trials(recs) if r.measured]
    assert mine, "no compressed student trial was measured"
    layers = _student_layers()
    for r in mine:
        assert set(r.plan["bits"]) == layers
        assert any(b < 32 for b in r.plan["bits"].values())
    study = load_existing_study(student_study.storage_url, "st")
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    for r in mine:
        assert all(k.startswith(param_prefix(SPEC)) for k in frozen[r.number].params)
    teacher = [r for r in recs if r.measured and r.base_model is None and r.baseline is None]
    assert teacher and all(not set(r.plan["bits"]) & {"stage1.0", "stage2.0"} for r in teacher)
    # the front is computed over both bases: a student trial is on it or dominated
    front = {r.number for r in student_study.result.front}
    for r in mine + _distilled(recs):
        dominated = any((o.accuracy or 0) >= (r.accuracy or 0) and (o.size_bytes or 0)
                        <= (r.size_bytes or 0) for o in student_study.result.front)
        assert r.number in front or dominated or not r.feasible


def test_second_run_does_not_distil_again(student_study: ShortStudy, tmp_path: Path) -> None:
    import shutil

    from tests.search_fixture import copy_short_study

    copy = copy_short_study(student_study, tmp_path / "again")
    before = len(_distilled(records(load_existing_study(copy.storage_url, "st"))))
    notes: list[str] = []
    from autocompress.config.options import SearchConfig
    from autocompress.search.loop import run_search

    run_search(SearchConfig(study="st", storage=copy.storage_url, trials=1, finetune_steps=20,
                            latency_repeats=6, budgets=("50ms",), guided=False,
                            students=(SPEC,), student_epochs=EPOCHS, promote_share=0.0,
                            artifacts=str(copy.artifacts_dir)),
               on_start=notes.append)
    recs = records(load_existing_study(copy.storage_url, "st"))
    assert len(_distilled(recs)) == before == 1
    assert any("not distilled again" in n for n in notes)
    shutil.rmtree(tmp_path / "again", ignore_errors=True)


def test_refine_and_export_a_student_trial(student_study: ShortStudy, tmp_path: Path) -> None:
    from tests.search_fixture import copy_short_study

    copy = copy_short_study(student_study, tmp_path / "refine")
    recs = records(load_existing_study(copy.storage_url, "st"))
    parent = next(r for r in _student_trials(recs) if r.measured)
    refined = refine_trial(copy.storage_url, "st", parent.number, 1,
                           artifacts_dir=str(copy.artifacts_dir))
    assert refined.base_model == SPEC and refined.measured
    assert refined.attrs[trial_attrs.PARENT] == parent.number
    assert set(refined.plan["bits"]) == _student_layers()
    for number in (refined.number, _distilled(recs)[0].number):
        result = export_from_storage(copy.storage_url, "st", out=tmp_path / f"out{number}",
                                     trial=number, artifacts_dir=copy.artifacts_dir)
        assert result.report["model_spec"] == SPEC
        assert result.report["verification"]  # re-measured the written file and agreed
    with pytest.raises(RefineError, match="distillation of student"):
        refine_trial(copy.storage_url, "st", _distilled(recs)[0].number, 1,
                     artifacts_dir=str(copy.artifacts_dir))


def test_bad_student_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    code = cli.main(["search", "--study", "bad", "--storage", url, "--trials", "1",
                     "--student", "tests.student_models:no_such_factory"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "--student" in err and "no_such_factory" in err
    assert len(err.splitlines()) == 1


# -- review fixes: the executorch target, errors that end the run, several workers -------


def test_student_search_on_the_executorch_target(tmp_path: Path) -> None:
    """The distillation trial's file is measured as the target runs it: its program is
    written beside its ONNX file (before the fix: "ExecuTorch program ... does not exist")."""
    from autocompress.runtime import executorch as executorch_runtime
    from tests.pg import unavailable

    reason = executorch_runtime.unavailable_reason()
    if reason is not None:
        unavailable(f"{reason}: pip install -e '.[dev]' (or '.[executorch]')")
    short = run_short_search(tmp_path, study="ets", target=executorch_runtime.TARGET, trials=2,
                             finetune_steps=10, guided=False, warm_starts=False,
                             baselines=False, budgets=(), students=(SPEC,), student_epochs=1,
                             promote_share=0.0)
    d = _distilled(short.result.records)
    assert len(d) == 1 and d[0].measured, d and d[0].fail_reason
    runtime = d[0].json_attr(trial_attrs.RUNTIME)
    assert runtime["target"] == executorch_runtime.TARGET
    program = d[0].json_attr(executorch_runtime.PROGRAM_ATTR)
    assert set(program["weight_types"].values()) == {"FLOAT"}  # the student's fp32 program
    assert d[0].attrs[trial_attrs.SIZE] == program["size_bytes"]
    assert d[0].attrs[executorch_runtime.ARTIFACT_ID_ATTR]
    mine = [r for r in _student_trials(short.result.records) if r.measured]
    assert mine and all(r.json_attr(executorch_runtime.PROGRAM_ATTR) for r in mine)


def test_an_error_every_student_trial_meets_ends_the_run() -> None:
    """``TrialRunner.fatal`` of a student's runner ends the search like the teacher's
    (before the fix only the teacher's runner was asked: the run went on to its limit)."""
    from typing import Any, cast

    from autocompress.search.loop import _ends_on_fatal
    from autocompress.search.students import StudentBase
    from autocompress.train.losses import TaskLossError
    from autocompress.train.student_distill import StudentRecipe
    from autocompress.trial.runner import TrialRunner
    from tests.student_models import tiny_student

    teacher = TrialRunner(cast(Any, None))
    base = StudentBase(SPEC, tiny_student(), teacher, StudentRecipe())
    base.runner = TrialRunner(cast(Any, None))
    teacher.bases[SPEC] = base
    seen: list[str] = []
    ending = _ends_on_fatal(teacher, lambda _study, frozen: seen.append(frozen))
    ending(None, "first")  # nothing fatal yet: the run goes on
    base.runner.fatal = TaskLossError("the loss returned NaN")
    with pytest.raises(TaskLossError, match="the loss returned NaN"):
        ending(None, "second")
    assert seen == ["first", "second"]  # the trial was counted before the run ended


def test_student_code_changed_since_distillation_is_one_line(
        student_study: ShortStudy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming with a student whose layers changed since it was distilled: one StudyError
    line (exit 2) saying what to do, not load_state_dict's traceback."""
    from torch import nn

    from autocompress.config.options import SearchConfig
    from autocompress.errors import StudyError
    from autocompress.search.loop import run_search
    from tests import student_models
    from tests.search_fixture import copy_short_study

    original = student_models.tiny_student

    def changed(num_classes: int = 10) -> nn.Module:
        model = original(num_classes)
        model.fc = nn.Linear(16, num_classes, bias=False)  # the stored fc.bias no longer fits
        return model

    copy = copy_short_study(student_study, tmp_path / "changed")
    monkeypatch.setattr(student_models, "tiny_student", changed)
    with pytest.raises(StudyError) as info:
        run_search(SearchConfig(study="st", storage=copy.storage_url, trials=1,
                                finetune_steps=20, latency_repeats=6, budgets=("50ms",),
                                guided=False, students=(SPEC,), student_epochs=EPOCHS,
                                promote_share=0.0, artifacts=str(copy.artifacts_dir)))
    message = str(info.value)
    assert "\n" not in message and "fc.bias" in message
    assert "do not fit the model it builds now" in message and "--study" in message


def _distillation_study(storage: object, name: str = "race") -> object:
    """A study as a search worker drives it (``WorkerStudy``: queued-first trials first;
    with a PostgreSQL storage, ``study_lock`` takes the advisory lock)."""
    import optuna

    from autocompress.study.resilient import ResilientStorage
    from autocompress.study.worker import WorkerStudy

    optuna.create_study(study_name=name, storage=storage, direction="maximize",  # type: ignore
                        load_if_exists=True)
    study = WorkerStudy(study_name=name, storage=storage)  # type: ignore[arg-type]
    if isinstance(storage, ResilientStorage):
        study.resilient = storage
    return study


def _fake_distil(study: object, calls: list[str], who: str, seconds: float = 1.0,
                 fail: str | None = None) -> object:
    """What ``students._distil_once`` queues and runs, with a sleep for the distillation."""
    import time

    from autocompress import study as study_mod

    def objective(trial: object) -> float:
        calls.append(who)
        time.sleep(seconds)
        if fail is not None:
            trial.set_user_attr(trial_attrs.FAIL_REASON, fail)  # type: ignore[attr-defined]
            raise RuntimeError(fail)
        trial.set_user_attr(trial_attrs.ACCURACY, 0.5)  # type: ignore[attr-defined]
        return 0.5

    def distil() -> None:
        study_mod.enqueue(study, {}, {trial_attrs.BASE_MODEL: SPEC,  # type: ignore[arg-type]
                                      trial_attrs.STUDENT_DISTILLED: SPEC}, first=True)
        study.optimize(objective, n_trials=1, catch=(Exception,))  # type: ignore[attr-defined]

    return distil


def test_two_workers_on_a_new_study_distil_once() -> None:
    """Two PostgreSQL workers with the same --student start at once: one distils under the
    study lock, the other finds its record (before the fix both distilled, and one could
    take the other's queued trial: "distilling ... failed: not run")."""
    import threading

    from autocompress import study as study_mod
    from autocompress.search import student_claim
    from tests.pg import fresh_database

    with fresh_database() as url:
        calls: list[str] = []
        got: dict[str, int] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def worker(who: str) -> None:
            try:
                study = _distillation_study(study_mod.open_storage(url))
                distil = _fake_distil(study, calls, who)
                start.wait()
                record = student_claim.distil_or_wait(study, SPEC, distil,  # type: ignore
                                                      wait_s=60, poll_s=0.1)
                got[who] = record.number
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(calls) == 1  # distilled once
        assert got["a"] == got["b"]
        study = _distillation_study(study_mod.open_storage(url))
        assert len(_distilled(records(study))) == 1  # type: ignore[arg-type]


def _running_distillation(study: object) -> object:
    """Another worker's distillation trial, claimed (RUNNING) and not finished yet."""
    from autocompress import study as study_mod

    study_mod.enqueue(study, {}, {trial_attrs.BASE_MODEL: SPEC,  # type: ignore[arg-type]
                                  trial_attrs.STUDENT_DISTILLED: SPEC}, first=True)
    return study.ask()  # type: ignore[attr-defined]


def test_a_worker_waits_for_another_workers_distillation() -> None:
    import threading

    import optuna

    from autocompress.search import student_claim

    study = _distillation_study(optuna.storages.InMemoryStorage())
    trial = _running_distillation(study)

    def finish() -> None:
        trial.set_user_attr(trial_attrs.ACCURACY, 0.7)  # type: ignore[attr-defined]
        study.tell(trial, 0.7)  # type: ignore[attr-defined]

    def must_not_distil() -> None:
        raise AssertionError("distilled although another worker is distilling")

    notes: list[str] = []
    timer = threading.Timer(0.5, finish)
    timer.start()
    record = student_claim.distil_or_wait(study, SPEC, must_not_distil, wait_s=30,
                                          poll_s=0.05, on_wait=notes.append)
    timer.join()
    assert record.number == trial.number and record.accuracy == 0.7  # type: ignore
    assert any("another worker" in n for n in notes)


def test_waiting_for_a_distillation_ends_in_one_line() -> None:
    import optuna

    from autocompress.errors import StudyError, TrainingError
    from autocompress.search import student_claim

    study = _distillation_study(optuna.storages.InMemoryStorage())
    trial = _running_distillation(study)
    with pytest.raises(StudyError, match=r"gave no result within 0 s; rerun") as info:
        student_claim.distil_or_wait(study, SPEC, lambda: None, wait_s=0.3, poll_s=0.05)
    assert "\n" not in str(info.value)
    trial.set_user_attr(trial_attrs.FAIL_REASON, "TrainingError: loss is NaN")  # type: ignore
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # type: ignore[attr-defined]
    # its worker failed it: no wait, and this worker distils itself (under the lock)
    calls: list[str] = []
    record = student_claim.distil_or_wait(study, SPEC, _fake_distil(study, calls, "me", 0.0),
                                          wait_s=0.3, poll_s=0.05)
    assert calls == ["me"] and record.measured
    failing = _distillation_study(optuna.storages.InMemoryStorage(), "failing")
    with pytest.raises(TrainingError, match=r"distilling student .* failed: it broke"):
        student_claim.distil_or_wait(failing, SPEC,
                                     _fake_distil(failing, [], "me", 0.0, fail="it broke"))
