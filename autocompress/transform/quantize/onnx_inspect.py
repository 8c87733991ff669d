"""Reading an ONNX file's weights by layer: where each quantizable weight sits (the node,
its output-channel axis, the tensors around it), how each layer's weight is stored, and the
weight scales of its DequantizeLinear. The exporters find their work with it and
``export_onnx`` checks every planned width against it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from autocompress.transform.quantize.onnx_float import _FUSION_PREFIX, _ONNX_TYPE_NAMES

# Weight input index of the ops whose weights we quantize (static, dynamic, QOperator forms).
_WEIGHT_INPUT: dict[str, int] = {
    "Conv": 1,
    "Gemm": 1,
    "MatMul": 1,
    "ConvInteger": 1,
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "Gather": 0,  # an embedding table (a Gather on a shape tensor has no weight initializer)
}


# The ops whose weights a plan quantizes (static QDQ and weight-only files).
QUANT_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
# Recurrent ops: W (input 1) and R (input 2) are the weights; ORT's integer LSTM keeps them
# at the same places.
RECURRENT_OPS: tuple[str, ...] = ("LSTM", "GRU", "RNN")
_RECURRENT_WEIGHTS = (1, 2)
_INTEGER_RECURRENT = "DynamicQuantizeLSTM"
# Weights whose parameter name is not "<layer>.weight": a MultiheadAttention's input
# projection (the layer is the attention module) and the recurrent matrices as
# onnx_recurrent names them ("lstm.weight_ih_l0": the layer is the LSTM module).
_OTHER_WEIGHT = re.compile(r"^(.+)\.(?:(?:in|q|k|v)_proj_weight|weight_(?:ih|hh)_l\d+)$")
# Ops that move a weight without changing its bytes (weight-only recurrent W and R are
# dequantized flat, one scale per row, then reshaped to [directions, gates, inputs]).
_PASS_THROUGH = ("DequantizeLinear", "Reshape")


def layer_of(initializer: str) -> str | None:
    """Layer name of a weight initializer name as exporters/ORT write it, else None."""
    name = initializer
    # ORT's quantizers append these (dynamic: "fc.weight_Transposed_quantized").
    for suffix in ("_quantized", "_Transposed", "_DequantizeLinear"):
        name = name.removesuffix(suffix)
    while _FUSION_PREFIX.match(name):
        name = _FUSION_PREFIX.sub("", name, count=1)
    other = _OTHER_WEIGHT.match(name)
    if other is not None:
        return other.group(1)
    if not name.endswith(".weight"):
        return None
    return name[: -len(".weight")]


def _weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the weight input of a Conv/Gemm/MatMul node."""
    if node.op_type == "MatMul":
        return 1  # x @ W with W [in, out]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0  # Conv: [out, in/groups, k...]


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight in a graph: its layer, initializer and node."""

    layer: str
    initializer: str
    node: str
    axis: int
    activation: str  # input tensor of the node
    output: str  # output tensor of the node


def weight_sites(proto: onnx.ModelProto) -> list[WeightSite]:
    """The Conv/Gemm/MatMul weights of ``proto`` that are ``<layer>.weight`` initializers."""
    initializers = {init.name for init in proto.graph.initializer}
    sites = []
    for node in proto.graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        layer = layer_of(weight)
        if weight not in initializers or layer is None:
            continue
        sites.append(
            WeightSite(layer, weight, node.name, _weight_axis(node), node.input[0], node.output[0])
        )
    return sites


def recurrent_sites(proto: onnx.ModelProto) -> list[WeightSite]:
    """W and R of every LSTM/GRU/RNN node whose weights onnx_recurrent named after their
    module (axis 1: one scale per gate row of each direction, [directions, rows, inputs])."""
    initializers = {init.name for init in proto.graph.initializer}
    sites = []
    for node in proto.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        for index in _RECURRENT_WEIGHTS:
            weight = node.input[index] if len(node.input) > index else ""
            layer = layer_of(weight)
            if weight in initializers and layer is not None:
                sites.append(WeightSite(layer, weight, node.name, 1, node.input[0],
                                        node.output[0] if node.output else ""))
    return sites


def gather_sites(proto: onnx.ModelProto) -> list[WeightSite]:
    """Embedding lookups: a Gather whose table is a ``<layer>.weight`` initializer (axis 0:
    one scale per row)."""
    initializers = {init.name for init in proto.graph.initializer}
    return [
        WeightSite(layer, node.input[0], node.name, 0, node.input[1], node.output[0])
        for node in proto.graph.node
        if node.op_type == "Gather" and node.input[0] in initializers
        and (layer := layer_of(node.input[0])) is not None
    ]


def onnx_weight_types(path: str | Path) -> dict[str, str]:
    """Layer name -> data type of its weight as stored in the file ("INT8"/"INT4"/"FLOAT").

    Follows each Conv/Gemm/MatMul, LSTM/GRU/RNN (W and R) or integer-op weight input back
    through DequantizeLinear (and the Reshape of weight-only recurrent weights) to the
    initializer that holds the bytes. A layer whose weights are stored in two types reports
    the wider one's name joined, e.g. "INT8+FLOAT" (none of our files do that).
    """
    proto = onnx.load(str(path), load_external_data=False)
    types: dict[str, set[str]] = {}
    for layer, init, _node, _dequantized in _weight_uses(proto):
        types.setdefault(layer, set()).add(_ONNX_TYPE_NAMES.get(init.data_type,
                                                                str(init.data_type)))
    return {layer: "+".join(sorted(found)) for layer, found in types.items()}


def layer_kernels(path: str | Path) -> dict[str, str]:
    """Layer name -> how the file runs it: the op reading its weights and, for a float op
    reading integer weights, whether its input is quantized too ("Gemm QDQ": integer kernels
    after ORT's fusion) or float ("GRU weight-only": weights dequantized at load, float
    kernel). Integer ops (``DynamicQuantizeLSTM``, ``MatMulInteger``...) by their name."""
    proto = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in proto.graph.node for out in node.output}
    kernels: dict[str, str] = {}
    for layer, init, node, dequantized in _weight_uses(proto):
        if init.data_type == onnx.TensorProto.FLOAT and not dequantized:
            kernels[layer] = f"{node.op_type} float"
        elif not dequantized:
            kernels[layer] = node.op_type  # an integer op holding its integer weights
        else:
            source = producers.get(node.input[0])
            quantized_input = source is not None and source.op_type == "DequantizeLinear"
            kernels[layer] = f"{node.op_type} {'QDQ' if quantized_input else 'weight-only'}"
    return kernels


def _weight_uses(
    proto: onnx.ModelProto,
) -> list[tuple[str, onnx.TensorProto, onnx.NodeProto, bool]]:
    """(layer, initializer holding the bytes, node reading the weight, whether a
    DequantizeLinear stands between them) for every weight input of a known op."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    uses = []
    for node in graph.node:
        if node.op_type in (*RECURRENT_OPS, _INTEGER_RECURRENT):
            indices: tuple[int, ...] = _RECURRENT_WEIGHTS
        elif node.op_type in _WEIGHT_INPUT:
            indices = (_WEIGHT_INPUT[node.op_type],)
        else:
            continue
        for index in indices:
            if len(node.input) <= index:
                continue
            name, dequantized = node.input[index], False
            while (producer := producers.get(name)) is not None and \
                    producer.op_type in _PASS_THROUGH:
                dequantized |= producer.op_type == "DequantizeLinear"
                name = producer.input[0]
            init = initializers.get(name)
            layer = layer_of(name)
            if init is not None and layer is not None:
                uses.append((layer, init, node, dequantized))
    return uses


def activation_types(path: str | Path) -> list[str]:
    """Data types the file quantizes activations to (QuantizeLinear of a computed tensor):
    ["UINT8"] for asymmetric 8-bit activations, ["INT8"] for symmetric; [] for none."""
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in proto.graph.initializer}
    found: set[str] = set()
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
        # No zero point: the output type is uint8 (the operator's default).
        dtype = zero_point.data_type if zero_point is not None else onnx.TensorProto.UINT8
        found.add(_ONNX_TYPE_NAMES.get(dtype, str(dtype)))
    return sorted(found)


def weight_scales(path: str | Path) -> dict[str, np.ndarray]:
    """Layer name -> per-channel weight scales of its DequantizeLinear (quantized layers)."""
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in proto.graph.initializer}
    scales: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        layer = layer_of(node.input[0])
        if layer is not None and node.input[1] in initializers:
            scales[layer] = numpy_helper.to_array(initializers[node.input[1]])
    return scales
