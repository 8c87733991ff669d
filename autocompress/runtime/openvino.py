"""OpenVINO adapter: the only module that imports ``openvino`` (an optional extra).

OpenVINO reads the same ONNX files ONNX Runtime runs (QDQ int8 included: its CPU plugin
turns QuantizeLinear/DequantizeLinear pairs into its own int8 kernels), so a search for the
``openvino-cpu`` target exports exactly what it would for ONNX Runtime and only the runtime
that times and scores the file changes. ``OpenVINOSession`` offers the two calls
``runtime`` makes on an ONNX Runtime session (``get_inputs`` and ``run``), so timing,
interleaving and scoring are one code path for every target.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autocompress.errors import InputError

INSTALL_HINT = "pip install 'autocompress[openvino]'"


@dataclass(frozen=True)
class _Input:
    name: str
    type: str = "tensor(float)"  # ONNX Runtime's spelling, which timing.py reads


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def version() -> str | None:
    if not available():
        return None
    import openvino

    return str(openvino.__version__)


class OpenVINOSession:
    """A compiled OpenVINO CPU model with ONNX Runtime's session interface (the subset used).

    One stream with ``threads`` inference threads and the latency hint: one request at a
    time, the way the latency of a deployed batch-1 model is measured. The batch dimension
    is made dynamic so scoring can feed batches of any size.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int,
                 options: Mapping[str, str] | None = None) -> None:
        if not available():
            raise InputError(f"the openvino-cpu target needs OpenVINO: {INSTALL_HINT}")
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(Path(path)))
        if len(model.inputs) != 1:
            names = [i.get_any_name() for i in model.inputs]
            raise InputError(f"ONNX model has inputs {names}; autocompress handles one input")
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0:
            dims = [shape[i] for i in range(shape.rank.get_length())]
            dims[0] = ov.Dimension(-1)
            model.reshape({model.inputs[0]: ov.PartialShape(dims)})
        config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", **dict(options or {})}
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        element = str(model.inputs[0].get_element_type())
        self._input = _Input(model.inputs[0].get_any_name() or "input",
                             "tensor(int64)" if element.startswith("<Type: 'int") or
                             "i64" in element else "tensor(float)")

    def get_inputs(self) -> list[_Input]:
        return [self._input]

    def run(self, _outputs: Sequence[str] | None, feed: Mapping[str, Any]) -> list[np.ndarray]:
        x = np.ascontiguousarray(next(iter(feed.values())))
        self._request.infer({0: x})
        return [np.asarray(self._request.get_output_tensor(0).data).copy()]

    def node_times(self) -> list[tuple[str, str, float]]:
        """(node, op type, ms) of the last run, executed nodes only (needs PERF_COUNT)."""
        return [(info.node_name, info.node_type, info.real_time.total_seconds() * 1e3)
                for info in self._request.get_profiling_info()
                if str(info.status).endswith("EXECUTED") and "NOT" not in str(info.status)]


def save_ir(onnx_path: str | os.PathLike[str], xml_path: str | os.PathLike[str]) -> list[Path]:
    """OpenVINO's own format (``.xml`` graph + ``.bin`` weights) of an ONNX file, weights kept
    at the file's precision (no fp16 compression: what was measured is what ships)."""
    if not available():
        raise InputError(f"writing OpenVINO IR needs OpenVINO: {INSTALL_HINT}")
    import openvino as ov

    xml = Path(xml_path)
    ov.save_model(ov.Core().read_model(str(Path(onnx_path))), str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]
