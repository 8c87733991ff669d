"""The study's fp32 latency reference: measured once per machine, reused, re-measured on
another machine (and said so), and the budget estimate built on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autocompress.config.options import SearchConfig
from autocompress.runtime import latency_reference as ref_mod
from autocompress.runtime.latency_reference import ReferenceLatency
from autocompress.search import session as search_mod
from autocompress.transform import quantize


class _FakeStudy:
    """The two things ``_resolve_reference`` touches on an Optuna study."""

    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def _ref(ms: float, host: str = "here") -> ReferenceLatency:
    return ReferenceLatency(ms, 0.01, [ms], 40, {"host": host, "threads": 1}, "now")


def test_reference_is_measured_once_per_machine_and_again_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    host = {"name": "machine-a"}

    def fake_measure(*_args: Any, **_kwargs: Any) -> ReferenceLatency:
        calls.append(host["name"])
        return _ref(1.0 if host["name"] == "machine-a" else 2.5, host["name"])

    real_machine = ref_mod.machine
    monkeypatch.setattr(ref_mod, "measure_reference", fake_measure)
    monkeypatch.setattr(ref_mod, "machine", lambda t, b: {**real_machine(t, b),
                                                          "host": host["name"]})
    study, notes = _FakeStudy(), []
    config = SearchConfig()
    first = search_mod._resolve_reference(study, Path("x.onnx"), (1, 8, 8), config, notes.append)
    again = search_mod._resolve_reference(study, Path("x.onnx"), (1, 8, 8), config, notes.append)
    assert first.median_ms == again.median_ms == 1.0 and calls == ["machine-a"]
    assert "measured when the study began" in notes[1]
    host["name"] = "machine-b"  # the same study resumed on another machine
    other = search_mod._resolve_reference(study, Path("x.onnx"), (1, 8, 8), config, notes.append)
    assert other.median_ms == 2.5 and calls == ["machine-a", "machine-b"]
    assert "re-measured" in notes[2] and "1 ms" in notes[2]
    stored = json.loads(study.user_attrs[ref_mod.REFERENCE_ATTR])
    assert len(stored) == 2  # both machines' references kept


def test_measure_reference_times_the_file_in_rounds(demo_task: Any, tmp_path: Path) -> None:
    onnx = quantize.export_float_onnx(demo_task.model, demo_task.data.example_input(1),
                                      tmp_path / "fp32.onnx")
    ref = ref_mod.measure_reference(onnx, (1, *demo_task.input_shape), threads=1,
                                    rounds=3, repeats=7)
    assert ref.runs == 21 and len(ref.round_medians_ms) == 3
    assert ref.median_ms > 0 and ref.spread_ms >= 0
    assert ref.machine["threads"] == 1 and ref.machine["batch_size"] == 1
    assert ReferenceLatency.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


def test_estimate_is_ratio_times_reference() -> None:
    assert ref_mod.estimate_ms(0.5, _ref(2.0)) == pytest.approx(1.0)
