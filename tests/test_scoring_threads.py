"""Accuracy scoring may use more ONNX Runtime threads than latency (``trial.measurement``
scores at the fine-tune's thread count): the file's outputs, and so its scores, must not
depend on the thread count, for float and for int8 QDQ files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from torch import nn

from autocompress.intake import load_data
from autocompress.runtime.scoring import onnx_accuracy, raw_outputs
from autocompress.runtime.sessions import input_name, make_session
from autocompress.transform.quantize.onnx_float import export_float_onnx


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._it = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def test_scores_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    fp32 = export_float_onnx(model, data.example_input(1), tmp_path / "fp32.onnx")
    batches = list(data.batches("val", 128))
    name = input_name(make_session(fp32))
    int8 = tmp_path / "int8.onnx"
    quantize_static(str(fp32), str(int8), _Reader(name, [x[:1].numpy() for x, _ in batches]),
                    quant_format=QuantFormat.QDQ)
    for path in (fp32, int8):
        one = raw_outputs(path, batches, threads=1)
        assert np.array_equal(one, raw_outputs(path, batches, threads=2)), path.name
        assert onnx_accuracy(path, batches, threads=1) == onnx_accuracy(path, batches, threads=2)
