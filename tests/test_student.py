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
