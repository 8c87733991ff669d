"""Guided plans, promotions and the final refine on one short real search (digits demo)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest

from autocompress import cli
from autocompress.export import export_from_storage
from autocompress.model.plan import CompressionPlan
from autocompress.search.refine import RefineError, refine_start, refine_trial
from autocompress.search.sensitivity import SENSITIVITY_ATTR
from autocompress.study import load_existing_study, records
from autocompress.study.records import TrialRecord
from tests.search_fixture import ShortStudy, run_short_search

STEPS = 30


@pytest.fixture(scope="module")
def guided_study(tmp_path_factory: pytest.TempPathFactory) -> ShortStudy:
    # promote_share 0.5 of 4 trials = 2 short fine-tunes: one promotion at factor 2
    return run_short_search(tmp_path_factory.mktemp("guided"), study="g", trials=4,
                            finetune_steps=STEPS, promote_share=0.5, promote_factor=2)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_guided_plan_meets_its_size_target(guided_study: ShortStudy) -> None:
    recs = guided_study.result.records
    fp32 = guided_study.result.fp32
    assert fp32 is not None and fp32.size_bytes
    guided = [r for r in recs if r.attrs.get("guided")]
    assert guided, "the search queued no guided plan"
    for r in guided:
        assert r.measured
        name = r.attrs["guided"]
        if name.endswith("x"):
            factor = float(name.removeprefix("guided-").removesuffix("x"))
            assert r.size_bytes is not None and r.size_bytes <= fp32.size_bytes / factor


def test_latency_model_is_fitted_before_the_guided_plans(guided_study: ShortStudy) -> None:
    from autocompress.search.guided import LATENCY_PROBES

    summary = load_existing_study(guided_study.storage_url, "g").user_attrs["latency_model"]
    assert summary["observations"] >= min(LATENCY_PROBES, 6)
    assert summary["coefficients"] is not None


def test_promotion_is_linked_and_replaces_its_parent(guided_study: ShortStudy) -> None:
    recs = {r.number: r for r in guided_study.result.records}
    promoted = [r for r in recs.values() if r.attrs.get("parent_trial") is not None]
    assert len(promoted) == 1
    child = promoted[0]
    parent = recs[child.attrs["parent_trial"]]
    assert child.plan["finetune_steps"] == 2 * STEPS
    assert parent.plan["finetune_steps"] == STEPS
    assert {k: v for k, v in child.plan.items() if k != "finetune_steps"} == {
        k: v for k, v in parent.plan.items() if k != "finetune_steps"}
    assert child.attrs["artifact_sha256"] != parent.attrs["artifact_sha256"]
    # where it started follows the refine's rule, recorded as a refine's is
    assert child.attrs["refine_start"] == refine_start(
        CompressionPlan.from_dict(child.plan), 2 * STEPS, parent)
    assert ("inherited_from" in child.attrs) == (child.attrs["refine_start"] == "parent")
    front = [r.number for r in guided_study.result.front]
    assert parent.number not in front
    if child.feasible and child.measured:
        # on the front unless another trial dominates it
        assert child.number in front or any(
            (o.accuracy or 0) >= (child.accuracy or 0) and (o.size_bytes or 0)
            <= (child.size_bytes or 0) for o in guided_study.result.front)


def test_sensitivity_command(guided_study: ShortStudy, capsys: pytest.CaptureFixture[str],
                             tmp_path: Path) -> None:
    code, out, _ = _cli(capsys, "sensitivity", "--study", "g", "--storage",
                        guided_study.storage_url, "--json")
    assert code == 0
    table = json.loads(out)
    assert table["metric"] == "kl_to_teacher" and set(table["layers"])
    code, out, _ = _cli(capsys, "sensitivity", "--study", "g", "--storage",
                        guided_study.storage_url)
    assert code == 0 and "Layer sensitivity" in out and "keep at higher precision" in out
    # a study without a table: one line, exit 2
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    optuna.create_study(study_name="bare", storage=url)
    code, _, err = _cli(capsys, "sensitivity", "--study", "bare", "--storage", url)
    assert code == 2 and "no sensitivity table" in err and len(err.strip().splitlines()) == 1
    study = load_existing_study(guided_study.storage_url, "g")
    assert SENSITIVITY_ATTR in study.user_attrs


def test_refine_records_a_new_trial_that_exports_verified(
    guided_study: ShortStudy, tmp_path: Path
) -> None:
    recs = guided_study.result.records
    parent = next(r for r in recs if r.attrs.get("warm_start") == "uniform-int8")
    steps_seen: list[int] = []
    record = refine_trial(guided_study.storage_url, "g", parent.number, 1,
                          on_step=lambda step, total: steps_seen.append(step))
    assert record.attrs["parent_trial"] == parent.number
    assert record.attrs["refine_epochs"] == 1
    # a refine (another process than the search) of a plan that does not prune trains on
    # from the parent's stored weights
    assert record.attrs["inherited_from"] == parent.number
    assert record.attrs["inherited_share"] == 1.0
    assert record.attrs["lineage_steps"] == (parent.attrs["lineage_steps"]
                                             + record.plan["finetune_steps"])
    train = json.loads(load_existing_study(guided_study.storage_url, "g")
                       .user_attrs["data"])["sizes"]["train"]
    assert record.plan["finetune_steps"] == math.ceil(train / 64)
    assert steps_seen[-1] == record.plan["finetune_steps"]
    assert record.measured and record.attrs["artifact_sha256"] != parent.attrs["artifact_sha256"]
    result = export_from_storage(guided_study.storage_url, "g", out=tmp_path / "out",
                                 trial=record.number)
    assert result.trial == record.number
    verification = result.verification
    assert verification is not None and verification["sha256_matches"]
    assert verification["agreement"] >= verification["agreement_floor"]


def test_refine_at_a_learning_rate_of_its_own(guided_study: ShortStudy) -> None:
    recs = guided_study.result.records
    parent = next(r for r in recs if r.measured and r.baseline is None
                  and r.attrs.get("parent_trial") is None)
    assert parent.plan["learning_rate"] != 2e-3  # the study's probed rate
    record = refine_trial(guided_study.storage_url, "g", parent.number, 1, learning_rate=2e-3)
    assert record.attrs["parent_trial"] == parent.number and record.measured
    assert record.plan["learning_rate"] == 2e-3


def _pruned_parent(study: ShortStudy) -> TrialRecord:
    return next(r for r in study.result.records if r.measured and r.baseline is None
                and any(v > 0 for v in r.plan["prune"].values())
                and not r.plan.get("sparsity") and r.attrs.get("torch_kind") == "qat")


def test_a_long_refine_of_a_pruned_plan_starts_from_the_teacher_with_batchnorm_live(
    guided_study: ShortStudy,
) -> None:
    parent = _pruned_parent(guided_study)
    train = json.loads(load_existing_study(guided_study.storage_url, "g")
                       .user_attrs["data"])["sizes"]["train"]
    epochs = math.ceil(parent.attrs["lineage_steps"] / math.ceil(train / 64))  # as long
    record = refine_trial(guided_study.storage_url, "g", parent.number, epochs)
    assert record.attrs["parent_trial"] == parent.number and record.measured
    # not the parent's folded weights: the teacher's, so that the first 3/4 of the refine
    # train with BatchNorm live at the recovery rate
    assert record.attrs["refine_start"] == "teacher"
    assert "inherited_from" not in record.attrs
    assert record.attrs["recovery_steps"] == int(0.75 * record.plan["finetune_steps"])
    assert record.attrs["lineage_steps"] == record.plan["finetune_steps"]


def test_a_short_refine_or_one_that_does_not_prune_trains_on_from_its_trial(
    guided_study: ShortStudy,
) -> None:
    parent = _pruned_parent(guided_study)
    plan = CompressionPlan.from_dict(parent.plan)
    lineage = parent.attrs["lineage_steps"]
    assert refine_start(plan, lineage, parent) == "teacher"
    assert refine_start(plan, lineage - 1, parent) == "parent"  # keeps the head start
    unpruned = dataclasses.replace(plan, prune={})
    assert refine_start(unpruned, 100 * lineage, parent) == "parent"


def test_refine_refuses_bad_requests(guided_study: ShortStudy,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    recs = guided_study.result.records
    fp32 = next(r for r in recs if r.baseline == "fp32")
    url = guided_study.storage_url
    with pytest.raises(RefineError, match="fp32 baseline"):
        refine_trial(url, "g", fp32.number, 1)
    with pytest.raises(RefineError, match="no trial 999"):
        refine_trial(url, "g", 999, 1)
    with pytest.raises(RefineError, match="--epochs 0"):
        refine_trial(url, "g", 2, 0)
    with pytest.raises(RefineError, match="--learning-rate 0 must be in"):
        refine_trial(url, "g", 2, 1, learning_rate=0.0)
    before = len(records(load_existing_study(url, "g")))
    code, _, err = _cli(capsys, "refine", "--study", "g", "--storage", url, "--trial",
                        str(fp32.number), "--epochs", "1")
    assert code == 2 and err.strip().startswith("error: trial")
    assert len(err.strip().splitlines()) == 1
    assert len(records(load_existing_study(url, "g"))) == before  # nothing recorded


def test_dashboard_shows_sensitivity_and_counts_each_plan_once(guided_study: ShortStudy) -> None:
    from autocompress.dashboard import create_app

    data = create_app(guided_study.storage_url).test_client().get("/api/study/g").get_json()
    assert set(data["sensitivity"]["layers"]) and set(data["sensitivity"]["groups"])
    by_number = {t["number"]: t for t in data["trials"]}
    child = next(t for t in data["trials"] if t["parent_trial"] is not None)
    parent = by_number[child["parent_trial"]]
    if child["feasible"]:
        assert parent["superseded"] and parent["number"] not in data["front_2d"]
        assert not parent["on_front"]
    assert any(t["guided"] for t in data["trials"])
