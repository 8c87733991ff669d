"""Reading an ONNX file's weights by layer: where each quantizable weight sits (the node,
its output-channel axis, the tensors around it), how each layer's weight is stored, and the
weight scales of its DequantizeLinear. The exporters find their work with it and
``export_onnx`` checks every planned width against it."""

from __future__ import annotations

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


def layer_of(initializer: str) -> str | None:
    """Layer name of a weight initializer name as exporters/ORT write it, else None."""
    name = initializer
    # ORT's quantizers append these (dynamic: "fc.weight_Transposed_quantized").
    for suffix in ("_quantized", "_Transposed", "_DequantizeLinear"):
        name = name.removesuffix(suffix)
    while _FUSION_PREFIX.match(name):
        name = _FUSION_PREFIX.sub("", name, count=1)
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

    Follows each Conv/Gemm/MatMul (or integer-op) weight input back through
    DequantizeLinear to the initializer that holds the bytes.
    """
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    types: dict[str, str] = {}
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        name = node.input[index]
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            name = producer.input[0]
        init = initializers.get(name)
        layer = layer_of(name)
        if init is None or layer is None:
            continue
        types[layer] = _ONNX_TYPE_NAMES.get(init.data_type, str(init.data_type))
    return types


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
