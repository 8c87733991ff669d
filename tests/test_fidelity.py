"""Calibration-only search trials (search/fidelity.py): chosen when too few fine-tunes fit
the time limit, realised by PTQ after pruning and BatchNorm re-estimation, said in the
table, and the best of them promoted to a fine-tune."""

from __future__ import annotations

from pathlib import Path

from search_fixture import run_short_search

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.search import fidelity
from autocompress.search.measured import structure_key
from autocompress.study import attrs as trial_attrs


def _settings(**changes: object) -> SearchSettings:
    return SearchSettings.from_config(SearchConfig(**changes))  # type: ignore[arg-type]


def test_auto_chooses_calibration_only_when_too_few_fine_tunes_fit() -> None:
    timed = _settings(time_limit=30)
    # 30 min, 75% of it for search trials, 5 min gone: 1,350 s; a fine-tune of 1,500 s
    # (resnet18 at 224x224 on 2 cores) fits not once
    assert fidelity.choose(timed, finetune_estimate=1500.0, elapsed=300.0) == "calibration"
    # ResNet-20's 70 s fine-tunes: many fit
    assert fidelity.choose(timed, finetune_estimate=70.0, elapsed=300.0) == "finetune"
    # no time limit, nothing to estimate, or the user's choice: as asked
    assert fidelity.choose(_settings(), finetune_estimate=1500.0, elapsed=0.0) == "finetune"
    assert fidelity.choose(timed, finetune_estimate=None, elapsed=0.0) == "finetune"
    forced = _settings(fidelity="finetune", time_limit=30)
    assert fidelity.choose(forced, finetune_estimate=1e6, elapsed=0.0) == "finetune"
    note = fidelity.note("calibration", finetune_estimate=1500.0, settings=timed)
    assert "about 1500 s" in note and "\n" not in note
    # 400 s a fine-tune, 1,350 s of search share: three fit, the search fine-tunes
    assert fidelity.choose(timed, finetune_estimate=400.0, elapsed=300.0) == "finetune"


def test_a_calibration_only_search_realises_trials_by_ptq_and_promotes_the_best(
        tmp_path: Path) -> None:
    study = run_short_search(tmp_path, fidelity="calibration", budgets=(), trials=6)
    records = study.result.records
    searched = [r for r in records if r.measured and r.baseline is None
                and r.attrs.get(trial_attrs.PARENT) is None]
    assert searched
    for r in searched:
        assert r.attrs.get(trial_attrs.FIDELITY) == "calibration"
        assert CompressionPlan.from_dict(r.plan).is_ptq
        assert not r.attrs.get(trial_attrs.FINETUNE_STEPS_RUN)  # nothing was fine-tuned
    # no structure is tried twice: the proposer knows a recorded PTQ trial is the QAT
    # candidate it proposed (keyed apart, one was proposed 41 times in a row)
    keys = [structure_key(space.as_qat(CompressionPlan.from_dict(r.plan))) for r in searched]
    assert len(keys) == len(set(keys))
    assert any(r.attrs.get(trial_attrs.PROPOSAL) for r in searched)
    promoted = [r for r in records if r.attrs.get(trial_attrs.PARENT) is not None]
    assert promoted, "the best calibration-only trial gets a fine-tune"
    parents = {r.number: r for r in searched}
    for r in promoted:
        assert r.attrs.get(trial_attrs.FIDELITY) == "fine-tune"
        assert int(r.attrs[trial_attrs.PARENT]) in parents
        assert not CompressionPlan.from_dict(r.plan).is_ptq  # trained by QAT + KD
    baselines = [r for r in records if r.baseline is not None]
    assert all(r.attrs.get(trial_attrs.FIDELITY) == "baseline" for r in baselines)
