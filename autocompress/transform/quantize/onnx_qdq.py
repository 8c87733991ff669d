"""QDQ ONNX files through ONNX Runtime's quantizer: a plan's static QDQ file (weights with the
QAT scales, activations with the QAT ranges or calibrated), its dynamic file, and plain PTQ
of a float file (static and dynamic). Every file ends with float logits and compact names.
ONNX Runtime's tools are reached through ``ort_tools`` only."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from autocompress.errors import InputError
from autocompress.transform.onnx_compact import compact_graph, drop_unused_initializers
from autocompress.transform.quantize.onnx_inspect import QUANT_OPS, weight_sites
from autocompress.transform.quantize.onnx_weight_only import weight_only_file
from autocompress.transform.quantize.qat import LearnedQuant
from autocompress.transform.quantize.scheme import QUANT_WEIGHT_BITS, _numpy_scales, weight_qmax

_WEIGHT_QTYPE: dict[int, str] = {8: "QInt8", 4: "QInt4"}
# (bits, scheme) -> ORT's activation type; "symmetric" also sets ActivationSymmetric.
_ACTIVATION_QTYPE: dict[tuple[int, str], str] = {
    (8, "asymmetric"): "QUInt8", (16, "asymmetric"): "QUInt16",
    (8, "symmetric"): "QInt8", (16, "symmetric"): "QInt16",
}
# ONNX Runtime's dynamic quantization (the ``dynamic`` PTQ method) has integer kernels for
# these ops (not Gemm).
_DYNAMIC_OPS = ("MatMul", "Conv")


# Weightless ops ORT's QDQ quantizer handles. Between quantized layers they are quantized too,
# so the integer path is not broken by a float residual Add (each costs a DequantizeLinear in
# and a QuantizeLinear out): on ResNet-20 uniform int8, quantizing the convolutions alone ran
# at 0.94x of fp32 on an AVX2 machine, ORT's all-op PTQ of the same network at 0.66x.
_JOIN_OPS: tuple[str, ...] = (
    "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Relu", "Clip",
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
)


def _name_nodes(proto: onnx.ModelProto) -> None:
    # nodes_to_quantize selects by node name; give unnamed nodes unique names.
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)


def _pre_processed(float_path: Path, tmp: Path) -> tuple[Path, onnx.ModelProto]:
    """ORT's quant_pre_process of ``float_path`` into ``tmp``, every node named (node names
    are how ORT's quantizers are told which nodes to quantize): the file and its graph."""
    from autocompress.transform.quantize import ort_tools as ort_quantize

    pre_path = ort_quantize.pre_process(float_path, tmp / "pre.onnx")
    proto = onnx.load(str(pre_path))
    _name_nodes(proto)
    onnx.save(proto, str(pre_path))
    return pre_path, proto


@dataclass
class _QdqRequest:
    """What ORT's QDQ quantizer is asked for: per-channel weight scales by initializer, the
    QAT ranges of the tensors into and out of quantized layers, the nodes to quantize and the
    bits requested per layer."""

    overrides: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    act_ranges: dict[str, tuple[float, int]] = field(default_factory=dict)
    output_ranges: dict[str, tuple[float, int]] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    requested: dict[str, int] = field(default_factory=dict)


def _qdq_request(
    proto: onnx.ModelProto,
    layer_bits: dict[str, int] | None,
    weight_bits: int,
    learned: dict[str, LearnedQuant],
) -> _QdqRequest:
    initializers = {init.name: init for init in proto.graph.initializer}
    request = _QdqRequest()
    for site in weight_sites(proto):
        bits = weight_bits if layer_bits is None else layer_bits.get(site.layer, 32)
        if bits >= 32:
            continue
        request.requested[site.layer] = bits
        request.nodes.append(site.node)
        layer_learned = learned.get(site.layer)
        qmax = layer_learned.weight_qmax if layer_learned else weight_qmax(bits)
        weight = numpy_helper.to_array(initializers[site.initializer])
        scales = _numpy_scales(weight, site.axis, qmax)
        request.overrides[site.initializer] = [
            {
                "quant_type": _WEIGHT_QTYPE[bits],
                "axis": site.axis,
                "scale": float(s),
                "zero_point": 0,
            }
            for s in scales
        ]
        if layer_learned is None:
            continue
        if layer_learned.input is not None and site.activation not in initializers:
            # Two quantized layers reading one tensor: keep the first (same data).
            request.act_ranges.setdefault(site.activation, layer_learned.input)
        if layer_learned.output is not None and site.initializer == f"{site.layer}.weight":
            # (A renamed weight means ORT fused something into the node, e.g. a BN the
            # PyTorch model still had: its output is then not the tensor QAT observed.)
            request.output_ranges[site.output] = layer_learned.output
    return request


def quantize_file(
    float_path: Path,
    out_path: Path,
    calibration: Iterable[Any],
    layer_bits: dict[str, int] | None,
    *,
    activation_bits: int,
    learned: dict[str, LearnedQuant],
    weight_bits: int = 8,
    op_types: tuple[str, ...] | None = QUANT_OPS,
    calibration_method: str = "minmax",
    activation_scheme: str = "asymmetric",
) -> dict[str, int]:
    """Pre-process and QDQ-quantize ``float_path``. ``layer_bits`` None means every layer at
    ``weight_bits``; activations uint (asymmetric) or int with zero point 0 (symmetric).
    Returns the bits actually requested per layer found in the graph."""
    from autocompress.transform.quantize import ort_tools as ort_quantize

    with tempfile.TemporaryDirectory(prefix="autocompress-q-") as tmp:
        pre_path, proto = _pre_processed(float_path, Path(tmp))
        request = _qdq_request(proto, layer_bits, weight_bits, learned)
        nodes = request.nodes
        if layer_bits is not None and nodes:
            nodes += _integer_neighbours(proto, set(nodes))
        act_ranges = request.act_ranges
        for tensor, qparams in request.output_ranges.items():
            act_ranges.setdefault(tensor, qparams)
        act_overrides = {tensor: {"scale": scale, "zero_point": zero_point}
                         for tensor, (scale, zero_point) in act_ranges.items()}
        if not nodes:
            shutil.copyfile(float_path, out_path)
            return request.requested
        ort_quantize.quantize_qdq(
            pre_path,
            out_path,
            calibration,
            activation_type=_ACTIVATION_QTYPE[(activation_bits, activation_scheme)],
            weight_overrides=request.overrides,
            activation_overrides=act_overrides,
            nodes_to_quantize=nodes if layer_bits is not None else None,
            op_types=None if op_types is None else (*op_types, *_JOIN_OPS),
            calibration_method=calibration_method,
        )
        _finish_quantized(out_path)
    return request.requested


def dynamic_file(
    float_path: Path, out_path: Path, layer_bits: dict[str, int], learned: dict[str, LearnedQuant]
) -> dict[str, int]:
    """The guide's recipe for Transformers, per layer: planned 8-bit MatMul/Conv layers
    quantized dynamically by ONNX Runtime (int8 weights, activations quantized at run time:
    MatMulInteger/ConvInteger, no calibration); every other planned layer (int4, or an op
    with no dynamic kernel such as Gemm) weight-only at its width. Returns the bits per layer."""
    from autocompress.transform.quantize import ort_tools as ort_quantize

    with tempfile.TemporaryDirectory(prefix="autocompress-d-") as tmp:
        pre_path, proto = _pre_processed(float_path, Path(tmp))
        op_of = {node.name: node.op_type for node in proto.graph.node}
        dynamic = {site.layer: site.node for site in weight_sites(proto)
                   if layer_bits.get(site.layer) == 8 and op_of[site.node] in _DYNAMIC_OPS}
        middle = Path(tmp) / "dynamic.onnx"
        if dynamic:
            ort_quantize.quantize_dynamic(pre_path, middle,
                                          nodes_to_quantize=list(dynamic.values()))
        else:
            shutil.copyfile(pre_path, middle)
        rest = {k: b for k, b in layer_bits.items() if k not in dynamic}
        requested = weight_only_file(middle, out_path, rest, learned)
    return {**dict.fromkeys(dynamic, 8), **requested}


def _integer_neighbours(proto: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """Weightless nodes (``_JOIN_OPS``) whose every non-constant input comes from a quantized
    node (directly or through other such nodes), in graph order: quantizing them keeps
    integer tensors integer. Nodes next to a float layer stay float (no Q/DQ is added)."""
    initializers = {init.name for init in proto.graph.initializer}
    integer: set[str] = set()
    extra: list[str] = []
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        if node.name in quantized:
            integer.update(node.output)
            continue
        dynamic = [t for t in node.input if t and t not in initializers]
        if node.op_type in _JOIN_OPS and dynamic and all(t in integer for t in dynamic):
            extra.append(node.name)
            integer.update(node.output)
    return extra


def _finish_quantized(path: Path) -> None:
    """Float logits and compact names for a file ORT's quantizer wrote (one load, one save)."""
    proto = onnx.load(str(path))
    _drop_output_qdq(proto)
    compact_graph(proto)
    onnx.save(proto, str(path))


def _drop_output_qdq(proto: onnx.ModelProto) -> int:
    """Remove QuantizeLinear->DequantizeLinear pairs that end in a graph output.

    ORT's QDQ quantizer also quantizes the last layer's output: uint8 logits (a step of
    ~0.08 here) flip the argmax of close calls for no speed gain. Returns pairs removed.
    """
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    remove: list[onnx.NodeProto] = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outputs:
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers[q.output[0]] != 1:
            continue
        source = producers.get(q.input[0])
        if source is None or consumers[q.input[0]] != 1:
            continue
        # Let the float producer write the graph output directly.
        source.output[list(source.output).index(q.input[0])] = dq.output[0]
        remove += [q, dq]
    if not remove:
        return 0
    for node in remove:
        graph.node.remove(node)
    drop_unused_initializers(graph)
    return len(remove) // 2


def ptq_static(
    float_onnx: str | Path,
    out: str | Path,
    calibration: Iterable[Any],
    *,
    weight_bits: int = 8,
    calibration_method: str = "minmax",
) -> Path:
    """Post-training static QDQ quantization of a float ONNX file, every layer alike.

    ORT's recommended recipe: quant_pre_process, uint8 activations, per-channel symmetric
    weights (int4 via overrides with axis set), all op types ORT can quantize.
    """
    if weight_bits not in QUANT_WEIGHT_BITS:
        raise InputError(f"weight_bits={weight_bits} is not supported; use 8 or 4")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_file(
        Path(float_onnx),
        out_path,
        calibration,
        None,
        activation_bits=8,
        learned={},
        weight_bits=weight_bits,
        op_types=None,
        calibration_method=calibration_method,
    )
    onnx.checker.check_model(str(out_path))
    return out_path


def ptq_dynamic(float_onnx: str | Path, out: str | Path) -> Path:
    """ORT dynamic quantization (int8 weights, activations quantized at run time)."""
    from autocompress.transform.quantize import ort_tools as ort_quantize

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autocompress-d-") as tmp:
        pre_path = ort_quantize.pre_process(float_onnx, Path(tmp) / "pre.onnx")
        ort_quantize.quantize_dynamic(pre_path, out_path, weight_type="QInt8")
    proto = onnx.load(str(out_path))
    compact_graph(proto)
    onnx.save(proto, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path
