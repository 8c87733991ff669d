"""LSTM/GRU/RNN weights in the ONNX file: named after their module, then stored at the plan's
width.

The TorchScript exporter writes an nn.LSTM as one ONNX ``LSTM`` node per layer whose W and R
are new initializers (``onnx::LSTM_351``: PyTorch's ``weight_ih_l0`` with its gate rows
reordered, both directions stacked). ``name_recurrent_weights`` finds the module each came
from by the rows themselves and renames them ``<module>.weight_ih_l<k>`` /
``<module>.weight_hh_l<k>``, so the file maps them back to the plan's layer like any other
weight (``onnx_inspect.layer_of``).

``recurrent_file`` then stores them:
- an LSTM at 8 bits with quantized activations: ONNX Runtime's ``DynamicQuantizeLSTM``
  (com.microsoft; int8 W and R per gate row with the QAT's scales, activations quantized at
  run time: ORT's only integer recurrent kernel, what its dynamic quantizer writes);
- every other planned recurrent layer (GRU, RNN, int4, float activations): weight-only,
  INT8/INT4 rows behind DequantizeLinear and a Reshape back to [directions, rows, inputs]
  (ORT folds them to float at load: the file is small, the kernel is the float one).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from autocompress.transform.onnx_compact import compact_graph
from autocompress.transform.quantize.onnx_inspect import WeightSite, recurrent_sites
from autocompress.transform.quantize.onnx_weight_only import _int4_tensor
from autocompress.transform.quantize.qat import LearnedQuant
from autocompress.transform.quantize.qat_sequence import RECURRENT_TYPES
from autocompress.transform.quantize.scheme import (
    WEIGHT_ONLY,
    _numpy_scales,
    recurrent_weight_qmax,
)

_MS_DOMAIN = "com.microsoft"  # ORT's contrib ops, DynamicQuantizeLSTM among them


def _rows_key(value: np.ndarray) -> tuple[str, ...]:
    """The rows of a weight matrix (or stack of them) as sorted digests: the same for a
    PyTorch parameter and its ONNX initializer whatever the gate order."""
    rows = np.ascontiguousarray(value, dtype=np.float32).reshape(-1, value.shape[-1])
    return tuple(sorted(hashlib.sha1(row.tobytes()).hexdigest() for row in rows))


def _module_weights(model: nn.Module) -> dict[tuple[tuple[str, ...], tuple[str, ...]], list]:
    """(W rows, R rows) -> [(module name, layer index)] for every recurrent layer."""
    found: dict[tuple[tuple[str, ...], tuple[str, ...]], list] = {}
    for name, module in model.named_modules():
        if not isinstance(module, RECURRENT_TYPES):
            continue
        suffixes = ("", "_reverse") if module.bidirectional else ("",)
        for k in range(module.num_layers):
            w = [getattr(module, f"weight_ih_l{k}{s}").detach().cpu().numpy() for s in suffixes]
            r = [getattr(module, f"weight_hh_l{k}{s}").detach().cpu().numpy() for s in suffixes]
            key = (_rows_key(np.concatenate(w)), _rows_key(np.concatenate(r)))
            found.setdefault(key, []).append((name, k))
    return found


def name_recurrent_weights(path: Path, model: nn.Module) -> int:
    """Rename the W and R initializers of the file's LSTM/GRU/RNN nodes after the module
    (and layer) of ``model`` they hold; returns the nodes named. Unmatched nodes keep their
    names (their layer then cannot be planned: export says so)."""
    proto = onnx.load(str(path))
    initializers = {init.name: init for init in proto.graph.initializer}
    owners = _module_weights(model)
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in ("LSTM", "GRU", "RNN") or len(node.input) < 3:
            continue
        w, r = initializers.get(node.input[1]), initializers.get(node.input[2])
        if w is None or r is None or w.name in renames:
            continue
        key = (_rows_key(numpy_helper.to_array(w)), _rows_key(numpy_helper.to_array(r)))
        if not owners.get(key):
            continue
        module, k = owners[key].pop(0)
        renames[w.name] = f"{module}.weight_ih_l{k}"
        renames[r.name] = f"{module}.weight_hh_l{k}"
    if not renames:
        return 0
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    onnx.save(proto, str(path))
    return len(renames) // 2


def recurrent_file(
    src: Path,
    dst: Path,
    layer_bits: dict[str, int],
    learned: dict[str, LearnedQuant],
    activation_bits: int,
) -> dict[str, int]:
    """Store the planned recurrent layers of ``src`` at their widths into ``dst`` (see the
    module docstring); returns the bits requested per layer found in the graph."""
    proto = onnx.load(str(src))
    sites = [s for s in recurrent_sites(proto) if layer_bits.get(s.layer, 32) < 32]
    if not sites:
        if src != dst:
            shutil.copyfile(src, dst)
        return {}
    op_of = {name: node.op_type for node in proto.graph.node for name in node.input}
    dynamic = {s.layer for s in sites if op_of[s.initializer] == "LSTM"
               and layer_bits[s.layer] == 8 and activation_bits < WEIGHT_ONLY}
    if dynamic:
        _dynamic_lstm(proto, [s for s in sites if s.layer in dynamic], learned)
    _weight_only(proto, [s for s in sites if s.layer not in dynamic], layer_bits, learned)
    compact_graph(proto)
    onnx.save(proto, str(dst))
    return {s.layer: layer_bits[s.layer] for s in sites}


def _dynamic_lstm(proto: onnx.ModelProto, sites: list[WeightSite],
                  learned: dict[str, LearnedQuant]) -> None:
    """Each LSTM node reading these weights becomes ORT's ``DynamicQuantizeLSTM`` (what
    ``quantize_dynamic`` writes for it, with the QAT's scales: int8 W and R per gate row,
    transposed to [directions, inputs, rows], zero points 0). Written here rather than by
    ``quantize_dynamic``, which also rewrites every Gemm of the graph into MatMul."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    layer_of_weight = {s.initializer: s.layer for s in sites}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "LSTM" or node.input[1] not in layer_of_weight:
            continue
        layer = layer_of_weight[node.input[1]]
        qmax = (learned[layer].weight_qmax if layer in learned
                else recurrent_weight_qmax(8, dynamic=True))
        quantized = []
        for name in node.input[1:3]:
            weight = numpy_helper.to_array(initializers[name])  # [dirs, rows, inputs]
            rows = weight.reshape(-1, weight.shape[-1])
            scales = _numpy_scales(rows, 0, qmax)
            q = np.clip(np.round(rows / scales[:, None]), -qmax, qmax).astype(np.int8)
            q = q.reshape(weight.shape).transpose(0, 2, 1)
            graph.initializer.remove(initializers[name])
            graph.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(q), f"{name}_quantized"),
                numpy_helper.from_array(scales.reshape(weight.shape[:2]), f"{name}_scale"),
                numpy_helper.from_array(np.zeros(weight.shape[:2], np.int8),
                                        f"{name}_zero_point"),
            ])
            quantized.append(name)
        optional = [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
        inputs = [node.input[0], *(f"{n}_quantized" for n in quantized), *optional]
        for name in quantized:
            inputs += [f"{name}_scale", f"{name}_zero_point"]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                      if a.name != "layout"}
        graph.node.remove(node)
        graph.node.insert(index, onnx.helper.make_node(
            "DynamicQuantizeLSTM", inputs, list(node.output), domain=_MS_DOMAIN, **attributes))
    if not any(entry.domain == _MS_DOMAIN for entry in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(_MS_DOMAIN, 1))


def _weight_only(proto: onnx.ModelProto, sites: list[WeightSite], layer_bits: dict[str, int],
                 learned: dict[str, LearnedQuant]) -> None:
    """Integer rows (one scale each) -> DequantizeLinear (axis 0) -> Reshape to the node's
    [directions, rows, inputs]: a row's scale is the one QAT simulated, per direction."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    added: list[onnx.NodeProto] = []
    for site in sites:
        if site.initializer not in initializers:
            continue  # read by two nodes: done once
        bits = layer_bits[site.layer]
        qmax = (learned[site.layer].weight_qmax if site.layer in learned
                else recurrent_weight_qmax(bits, dynamic=False))
        weight = numpy_helper.to_array(initializers.pop(site.initializer))
        rows = weight.reshape(-1, weight.shape[-1])
        scales = _numpy_scales(rows, 0, qmax)
        q = np.clip(np.round(rows / scales[:, None]), -qmax, qmax).astype(np.int8)
        name = site.initializer
        q_init = (_int4_tensor(f"{name}_quantized", q) if bits == 4
                  else numpy_helper.from_array(q, f"{name}_quantized"))
        graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
        graph.initializer.extend([
            q_init, numpy_helper.from_array(scales, f"{name}_scale"),
            numpy_helper.from_array(np.asarray(weight.shape, dtype=np.int64), f"{name}_shape"),
        ])
        added += [
            onnx.helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale"],
                                  [f"{name}_rows"], axis=0),
            onnx.helper.make_node("Reshape", [f"{name}_rows", f"{name}_shape"], [name]),
        ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(added + nodes)  # producers first: the graph stays sorted
