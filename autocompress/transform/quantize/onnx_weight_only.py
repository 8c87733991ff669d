"""Weight-only ONNX files: integer weights (INT8/INT4, per output channel, the QAT scales)
behind DequantizeLinear, float activations; written directly, no ONNX Runtime quantizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from autocompress.transform.onnx_compact import compact_graph
from autocompress.transform.quantize.onnx_inspect import WeightSite, weight_sites
from autocompress.transform.quantize.qat import LearnedQuant
from autocompress.transform.quantize.scheme import _numpy_scales, weight_only_qmax


def weight_only_file(
    float_path: Path, out_path: Path, layer_bits: dict[str, int], learned: dict[str, LearnedQuant],
    *, sites: Callable[[onnx.ModelProto], list[WeightSite]] = weight_sites,
) -> dict[str, int]:
    """Integer weights behind DequantizeLinear, float activations: each planned layer's
    weight initializer W becomes ``W_quantized`` (INT8/INT4, per output channel, symmetric,
    the QAT scales) plus ``W_scale``, and a DequantizeLinear writes W where the layer reads
    it. Returns the bits requested per layer found in the graph."""
    proto = onnx.load(str(float_path))
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    dequantize: list[onnx.NodeProto] = []
    requested: dict[str, int] = {}
    done: set[str] = set()  # an initializer two nodes read is quantized once
    for site in sites(proto):
        bits = layer_bits.get(site.layer, 32)
        if bits >= 32 or site.initializer in done:
            continue
        done.add(site.initializer)
        layer_learned = learned.get(site.layer)
        qmax = layer_learned.weight_qmax if layer_learned else weight_only_qmax(bits)
        weight = numpy_helper.to_array(initializers[site.initializer])
        scales = _numpy_scales(weight, site.axis, qmax).astype(np.float32)
        shape = [1] * weight.ndim
        shape[site.axis] = -1
        q = np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
        name = site.initializer
        if bits == 4:
            q_init = _int4_tensor(f"{name}_quantized", q)
        else:
            q_init = numpy_helper.from_array(q, f"{name}_quantized")
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([q_init, numpy_helper.from_array(scales, f"{name}_scale")])
        dequantize.append(onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_quantized", f"{name}_scale"], [name], axis=site.axis
        ))
        requested[site.layer] = bits
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)  # producers first: the graph stays sorted
    compact_graph(proto)
    onnx.save(proto, str(out_path))
    return requested


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """INT4 initializer packed two values per byte in ``raw_data`` (first value in the low
    nibble, as the ONNX spec says). ``helper.make_tensor`` with a list stores each value as a
    varint in ``int32_data``: about twice the bytes."""
    flat = values.astype(np.int8).flatten()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int8)])
    nibbles = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.INT4
    tensor.dims.extend(values.shape)
    tensor.raw_data = packed.tobytes()
    return tensor
