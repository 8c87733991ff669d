"""Shrink an ONNX graph's bookkeeping bytes without changing what it computes.

Bookkeeping weighs on a small model's quantized file: ResNet-20 at int4 held 138 KB of
weights in a 204 KB file, beside 41 KB of graph nodes (35 KB of them tensor and node names
such as "/layer1/layer1.0/conv1/Conv_output_0_QuantizeLinear_Output") and 3 KB of shape
annotations. Size is an
objective the search optimises and the user pays for, so every file the package writes goes
through :func:`compact_graph`:

- intermediate tensors get short names (``t0``, ``t1``...); graph inputs, outputs and
  initializers keep theirs (initializer names map weights back to layers);
- node names are cleared (ONNX Runtime names nodes itself; nothing downstream reads them);
- ``value_info`` shape annotations are dropped (ONNX Runtime infers shapes at load);
- a DequantizeLinear of an int32 initializer (ORT's quantized biases) loses its all-zero
  zero-point input, which the operator defaults to 0: one int32 per channel saved.

Graphs with subgraphs (If/Loop bodies refer to outer tensors by name) keep their tensor names
and initializers; only node names and shape annotations go.

Outputs are bit-identical and ONNX Runtime fuses the same QLinearConv/QGemm groups (checked
on ResNet-20 int8 and int4 files; tests/test_onnx_compact.py keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper

_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass(frozen=True)
class CompactStats:
    """What :func:`compact_graph` removed."""

    renamed_tensors: int
    cleared_node_names: int
    dropped_value_info: int
    dropped_zero_points: int


def compact_graph(proto: onnx.ModelProto) -> CompactStats:
    """Compact ``proto`` in place (see the module docstring); returns what changed."""
    graph = proto.graph
    nested = any(a.type in _SUBGRAPH_TYPES for node in graph.node for a in node.attribute)
    dropped_zero_points = 0 if nested else _drop_int32_zero_points(graph)
    dropped_value_info = len(graph.value_info)
    del graph.value_info[:]
    renamed = 0 if nested else _shorten_tensor_names(graph)
    cleared = sum(1 for node in graph.node if node.name)
    for node in graph.node:
        node.name = ""
    return CompactStats(renamed, cleared, dropped_value_info, dropped_zero_points)


def _drop_int32_zero_points(graph: onnx.GraphProto) -> int:
    initializers = {init.name: init for init in graph.initializer}
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        data = initializers.get(node.input[0])
        zero_point = initializers.get(node.input[2])
        if data is None or zero_point is None or data.data_type != onnx.TensorProto.INT32:
            continue
        if numpy_helper.to_array(zero_point).any():
            continue
        del node.input[2]
        dropped += 1
    if dropped:
        drop_unused_initializers(graph)
    return dropped


def drop_unused_initializers(graph: onnx.GraphProto) -> int:
    """Remove initializers that no node reads and no graph output names; returns how many.
    (Not for graphs with If/Loop bodies, which may read outer initializers.)"""
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return len(unused)


def _shorten_tensor_names(graph: onnx.GraphProto) -> int:
    # Names that the outside world sees or that identify weights stay as they are.
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    keep |= {init.name for init in graph.initializer}
    taken = set(keep)
    mapping: dict[str, str] = {}
    counter = 0
    for node in graph.node:
        for index, name in enumerate(node.output):
            if not name or name in keep:
                continue
            if name not in mapping:
                short = f"t{counter}"
                while short in taken:  # a model input literally called "t3"
                    counter += 1
                    short = f"t{counter}"
                counter += 1
                taken.add(short)
                mapping[name] = short
            node.output[index] = mapping[name]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in mapping:
                node.input[index] = mapping[name]
    return len(mapping)
