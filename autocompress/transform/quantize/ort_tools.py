"""ONNX Runtime's quantization tools (static QDQ, dynamic, pre-processing), called by
``quantize``, which never imports onnxruntime itself. ``runtime`` is the other half of the
ONNX Runtime adapter: sessions, scoring and timing.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocompress.errors import InputError, one_line
from autocompress.runtime.scoring import split_batch

log = logging.getLogger(__name__)

_QUANT_TYPES = ("QInt8", "QUInt8", "QInt4", "QUInt4", "QInt16", "QUInt16")


class _BatchReader:
    """CalibrationDataReader over an iterable of input batches (tensors/arrays or (x, y))."""

    def __init__(self, input_name: str, batches: Iterable[Any]) -> None:
        self._name = input_name
        self._iter: Iterator[Any] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is None:
            return None
        self.count += 1
        x, _ = split_batch(batch)
        return {self._name: x}

    def __iter__(self) -> _BatchReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    if name not in _QUANT_TYPES:
        raise ValueError(f"quant type {name!r} is not one of {list(_QUANT_TYPES)}")
    return getattr(QuantType, name)


def pre_process(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ORT's recommended step before static quantization (shape inference + optimization).

    Measured here: resnet50 int8 went from 2x slower than fp32 to 3x faster with it. Symbolic
    shape inference fails on some graphs; we then retry without it, and finally copy the file
    unchanged (quantization still works, it may just miss a few tensors).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst_path = Path(dst)
    attempts = (("with symbolic shape inference", {}),
                ("without it", {"skip_symbolic_shape": True}))
    failures: list[str] = []
    for how, kwargs in attempts:
        try:
            quant_pre_process(str(src), str(dst_path), **kwargs)
            if failures:  # a recovered first attempt is not the user's concern: debug only
                log.debug("quant_pre_process: %s; it worked %s", "; ".join(failures), how)
            return dst_path
        except Exception as exc:  # ORT raises bare Exceptions, often with no message
            failures.append(f"{how}: {one_line(exc, typed=True)}")
    log.warning("ONNX Runtime's quant_pre_process failed (%s); quantizing %s without "
                "pre-processing", "; ".join(failures), Path(src).name)
    dst_path.write_bytes(Path(src).read_bytes())
    return dst_path


def quantize_qdq(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Iterable[Any],
    *,
    activation_type: str = "QUInt8",
    weight_overrides: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    activation_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    nodes_to_quantize: Sequence[str] | None = None,
    op_types: Sequence[str] | None = None,
    calibration_method: str = "minmax",
) -> Path:
    """``quantize_static`` in QDQ format with per-channel weights and calibrated activations.

    ``calibration_method``: how activation ranges are read from the calibration batches:
    ``minmax`` (the observed range), ``entropy`` (the range minimising the KL divergence of
    the quantized histogram, TensorRT's method) or ``percentile`` (99.999th percentile of
    |x|: outliers clipped).

    ``weight_overrides``: initializer name -> one dict per output channel of plain values
    ``{"quant_type": "QInt4"|"QInt8", "axis": int, "scale": float, "zero_point": int}``;
    ``activation_overrides``: tensor -> ``{"scale", "zero_point"}`` (QAT's); QInt8 is symmetric.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration_method not in methods:
        raise InputError(f"calibration method {calibration_method!r} is unknown; use one of "
                         f"{sorted(methods)}")
    act_type = _quant_type(activation_type)
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, channels in (weight_overrides or {}).items():
        overrides[name] = [_convert_override(ch, "QInt8") for ch in channels]
    for name, params in (activation_overrides or {}).items():
        overrides[name] = [_convert_override(params, activation_type)]
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise InputError("calibration gave no batches; pass at least one input batch")
    reader = _BatchReader(_graph_input_name(src), itertools.chain([first], batches))
    with warnings.catch_warnings():
        # numpy's "invalid value in divide" for a constant tensor (a padding mask) whose range
        # is zero: ORT handles it; the user's stderr should not show it (-v shows logs).
        warnings.simplefilter("ignore", RuntimeWarning)
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            calibrate_method=methods[calibration_method],
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=True,
            activation_type=act_type,
            weight_type=_quant_type("QInt8"),
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
            extra_options={"TensorQuantOverrides": overrides, "ActivationSymmetric":
                           activation_type in ("QInt8", "QInt16")},  # zero point 0
        )
    return Path(dst)


def _graph_input_name(path: str | os.PathLike[str]) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise InputError(f"ONNX model has inputs {names}; autocompress handles one image input")
    return names[0]


_ZERO_POINT_DTYPE: dict[str, Any] = {
    "QInt8": np.int8,
    "QUInt8": np.uint8,
    "QInt4": np.int8,  # ORT packs 4-bit values itself; it takes them in 8-bit containers
    "QUInt4": np.uint8,
    "QInt16": np.int16,
    "QUInt16": np.uint16,
}


def _convert_override(entry: Mapping[str, Any], default_type: str) -> dict[str, Any]:
    """Plain values -> the numpy scalars ORT's override code expects (it calls .squeeze())."""
    type_name = str(entry.get("quant_type", default_type))
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "quant_type":
            out[key] = _quant_type(str(value))
        elif key == "scale":
            out[key] = np.asarray(value, dtype=np.float32)
        elif key == "zero_point":
            out[key] = np.asarray(value, dtype=_ZERO_POINT_DTYPE[type_name])
        elif key == "axis":
            out[key] = int(value)
        else:
            out[key] = value
    return out


def quantize_dynamic(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, weight_type: str = "QInt8",
    nodes_to_quantize: Sequence[str] | None = None,
) -> Path:
    """ORT dynamic quantization: int8 weights, activations quantized on the fly at run time
    (every node ORT can, or only ``nodes_to_quantize``)."""
    from onnxruntime.quantization import quantize_dynamic as _quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # as in quantize_qdq
        _quantize_dynamic(str(src), str(dst), weight_type=_quant_type(weight_type),
                          nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize
                          else None)
    return Path(dst)
