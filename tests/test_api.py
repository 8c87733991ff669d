"""The Python API: load_study / StudyHandle / rebuild, on the short real search that
test_export.py runs (shared: one search per test process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from search_fixture import ShortStudy
from test_export import fp32_trial, qat_trial

from autocompress import api, intake
from autocompress.errors import PlanError, StudyError
from autocompress.model.plan import CompressionPlan
from autocompress.results.pareto import dominates, pareto_front
from autocompress.runtime import scoring
from autocompress.study import download, load_existing_study, records
from autocompress.transform import quantize


@pytest.fixture(scope="module")
def handle(short_study: ShortStudy) -> api.StudyHandle:
    return api.load_study(short_study.study, short_study.storage_url)


@pytest.fixture(scope="module")
def val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(intake.load_data("digits", seed=0).batches("val", 256))


def _agreement(model: torch.nn.Module, onnx_path: Path,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        torch_pred = torch.cat([model(x).argmax(dim=1) for x, _ in batches]).numpy()
    onnx_pred = scoring.predictions(onnx_path, [x for x, _ in batches], threads=1)
    return float((torch_pred == onnx_pred).mean())


def _artifact(short_study: ShortStudy, record_attrs: dict, key: str, dest: Path) -> Path:
    from autocompress.study import artifact_store

    download(artifact_store(short_study.artifacts_dir), record_attrs[key], dest)
    return dest


def test_records_front_and_trial(handle: api.StudyHandle, short_study: ShortStudy) -> None:
    stored = records(load_existing_study(short_study.storage_url, short_study.study))
    assert [r.number for r in handle.records()] == [r.number for r in stored]
    front = handle.pareto_front()
    assert front == pareto_front(stored, ("accuracy", "size"))
    assert front and all(r.measured and r.feasible for r in front)
    for r in front:
        assert not any(dominates(o, r, ("accuracy", "size")) for o in stored
                       if o.measured and o.feasible)
    assert handle.trial(front[0].number) == front[0]
    with pytest.raises(StudyError, match="trial 999 does not exist"):
        handle.trial(999)


def test_load_study_refuses_unknown_study(short_study: ShortStudy) -> None:
    with pytest.raises(StudyError, match="study 'nope' not found"):
        api.load_study("nope", short_study.storage_url)


def test_export_takes_a_record(handle: api.StudyHandle, short_study: ShortStudy,
                               tmp_path: Path) -> None:
    record = fp32_trial(short_study)
    result = handle.export(record, tmp_path / "out", verify=False)
    assert result.trial == record.number
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert result.to_dict()["files"]["model.onnx"]["sha256"] == record.attrs["artifact_sha256"]
    assert f"exported trial {record.number}" in result.summary()


def test_rebuilt_qat_model_matches_its_onnx_file(
    handle: api.StudyHandle, short_study: ShortStudy, tmp_path: Path,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    record = qat_trial(short_study)
    model = handle.rebuild(record.number)
    assert quantize.is_prepared(model) and not model.training
    onnx_path = _artifact(short_study, record.attrs, "artifact_id", tmp_path / "m.onnx")
    assert _agreement(model, onnx_path, val_batches) >= 0.99

    # The same model from plain data through the public rebuild().
    state = _artifact(short_study, record.attrs, "torch_artifact_id", tmp_path / "s.pt")
    again = api.rebuild("demo", None, record.plan, num_classes=10, input_shape=(1, 8, 8),
                        state_dict=state)
    x = val_batches[0][0]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_rebuilt_baseline_is_the_float_model(
    handle: api.StudyHandle, short_study: ShortStudy, tmp_path: Path,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    record = fp32_trial(short_study)
    model = handle.rebuild(record)
    assert not quantize.is_prepared(model)
    onnx_path = _artifact(short_study, record.attrs, "artifact_id", tmp_path / "fp32.onnx")
    assert _agreement(model, onnx_path, val_batches) >= 0.99


def test_rebuild_refuses_a_state_dict_of_another_plan(
    short_study: ShortStudy, tmp_path: Path
) -> None:
    record = qat_trial(short_study)
    state = _artifact(short_study, record.attrs, "torch_artifact_id", tmp_path / "s.pt")
    other = CompressionPlan(bits={"conv1": 8})  # unpruned: every shape differs or is missing
    with pytest.raises(PlanError, match="state_dict does not fit the model rebuilt"):
        api.rebuild("demo", None, other, num_classes=10, input_shape=(1, 8, 8),
                    state_dict=state)


def test_rebuild_needs_an_input_size() -> None:
    with pytest.raises(PlanError, match="pass input_size=N"):
        api.rebuild("demo", None, CompressionPlan(), num_classes=10)
    model = api.rebuild("demo", None, CompressionPlan(bits={"conv1": 8}), num_classes=10,
                        input_size=8)
    assert quantize.is_prepared(model)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
