"""Fake-quant modules for QAT, BatchNorm folding, and export of a model to QDQ ONNX per plan.

Quantization scheme (the same in training and in the exported file):
- weights: symmetric, per output channel, ``scale = max|w_c| / qmax`` (int8: [-127, 127],
  int4: [-7, 7]), zero point 0. The scale is a function of the weights, so the scales
  "learned" in QAT are the ones recomputed from the fine-tuned weights at export; they go
  into the file through ORT's ``TensorQuantOverrides`` with ``axis`` set explicitly (without
  it ORT silently falls back to per-tensor int4: -6.7 pt on ResNet-20, design rule 3).
  On x86 CPUs without VNNI, int8 weights use [-63, 63]: ORT's u8s8 kernels there add pairs
  of uint8*int8 products in int16 and saturate (seen here: a digits CNN's first conv made
  the file disagree with its fake-quant twin on 7% of samples; with 7-bit weights, on
  none). That is ORT's documented ``reduce_range`` remedy; see int8_weight_qmax.
- activations: per-tensor affine uint8 (uint16 when ``plan.activation_bits == 16``) on the
  input and output of each quantized layer (where ORT's QDQ quantizer puts Q/DQ), ranges
  from EMA min/max observers frozen in eval. The ranges are carried into the file, so ONNX
  Runtime computes what QAT trained.
- layers at 32 bits: untouched, no weight or activation quantization of their own.
- weight-only (``plan.activation_bits == 32``): the same weights, no activation
  quantization; exported as integer initializers behind DequantizeLinear with float
  activations (no ORT quantizer involved). int8 then uses the full [-127, 127]: no integer
  kernel runs, so the u8s8 saturation cannot happen.

Export path: strip fake-quant -> fold BN -> float ONNX (TorchScript exporter, opset 20,
upgraded to 21 for native INT4 Q/DQ) -> ``quant_pre_process`` -> ``quantize_static`` (QDQ)
-> float logits and short tensor names (onnx_compact.py). All onnxruntime calls go through
``runtime`` (sessions) and ``ort_tools`` (ONNX Runtime's quantization tools).

The package by job: ``scheme`` (widths, ranges, scales), ``qat`` (fake-quant modules,
calibration), ``bn_fold`` (BatchNorm folding), ``onnx_float`` (the float export),
``onnx_export`` (a plan's file, checked), ``onnx_qdq`` (QDQ and dynamic files, PTQ, through
``ort_tools``), ``onnx_weight_only`` (weight-only files) and ``onnx_inspect`` (a file's weights
by layer).
"""

from __future__ import annotations

from autocompress.transform.onnx_compact import compact_graph  # re-exported: the file layout step
from autocompress.transform.quantize.bn_fold import (
    fold_batchnorm,
)
from autocompress.transform.quantize.onnx_export import (
    DYNAMIC,
    ExportInfo,
    export_onnx,
)
from autocompress.transform.quantize.onnx_float import (
    EXPORT_OPSET,
    export_float_onnx,
)
from autocompress.transform.quantize.onnx_inspect import onnx_weight_types, weight_scales
from autocompress.transform.quantize.onnx_qdq import ptq_dynamic, ptq_static
from autocompress.transform.quantize.qat import (
    LearnedQuant,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    calibrate,
    is_prepared,
    prepare_qat,
    strip_fake_quant,
)
from autocompress.transform.quantize.scheme import (
    ACTIVATION_QMAX,
    INT4_QMAX,
    INT8_FULL_QMAX,
    INT8_RANGE_ENV,
    INT8_REDUCED_QMAX,
    ONNX_FORMAT,
    QUANT_WEIGHT_BITS,
    WEIGHT_ONLY,
    fake_quant_per_tensor_weight,
    fake_quant_weight,
    int8_weight_qmax,
    symmetric_scales,
    weight_only_qmax,
    weight_qmax,
)

__all__ = [
    "ACTIVATION_QMAX",
    "DYNAMIC",
    "EXPORT_OPSET",
    "INT4_QMAX",
    "INT8_FULL_QMAX",
    "INT8_RANGE_ENV",
    "INT8_REDUCED_QMAX",
    "ONNX_FORMAT",
    "QUANT_WEIGHT_BITS",
    "WEIGHT_ONLY",
    "ExportInfo",
    "LearnedQuant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "calibrate",
    "compact_graph",
    "export_float_onnx",
    "export_onnx",
    "fake_quant_per_tensor_weight",
    "fake_quant_weight",
    "fold_batchnorm",
    "int8_weight_qmax",
    "is_prepared",
    "onnx_weight_types",
    "prepare_qat",
    "ptq_dynamic",
    "ptq_static",
    "strip_fake_quant",
    "symmetric_scales",
    "weight_only_qmax",
    "weight_qmax",
    "weight_scales",
]
