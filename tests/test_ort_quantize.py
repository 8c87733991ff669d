"""ONNX Runtime's quantization adapter: what its pre-processing failures tell the user."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from autocompress.transform.quantize import ort_tools as ort_quantize


def test_pre_process_failures_are_one_warning_naming_each_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ORT raises bare ``Exception()``s: the log said "quant_pre_process  failed ();
    retrying" twice mid-search. A recovered first attempt now says nothing at warning level;
    when both fail, one warning names each attempt and the file, which is copied as it is."""
    from onnxruntime.quantization import shape_inference

    src, dst = tmp_path / "model.onnx", tmp_path / "pre.onnx"
    src.write_bytes(b"onnx bytes")
    calls: list[dict[str, bool]] = []

    def first_fails(source: str, target: str, **kwargs: bool) -> None:
        calls.append(kwargs)
        if not kwargs:
            raise Exception()  # what ORT raises
        Path(target).write_bytes(b"processed")

    monkeypatch.setattr(shape_inference, "quant_pre_process", first_fails)
    with caplog.at_level(logging.INFO, logger="autocompress"):
        assert ort_quantize.pre_process(src, dst).read_bytes() == b"processed"
    assert calls == [{}, {"skip_symbolic_shape": True}]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()

    def always_fails(source: str, target: str, **kwargs: bool) -> None:
        raise Exception()

    monkeypatch.setattr(shape_inference, "quant_pre_process", always_fails)
    with caplog.at_level(logging.WARNING, logger="autocompress"):
        assert ort_quantize.pre_process(src, dst).read_bytes() == b"onnx bytes"
    [warning] = [r.getMessage() for r in caplog.records]
    assert "with symbolic shape inference: Exception" in warning
    assert "without it: Exception" in warning and "quantizing model.onnx" in warning
