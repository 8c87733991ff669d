"""Export to ONNX: float export, QDQ and weight-only files per plan, PTQ, inspection."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from autocompress.errors import InputError, PlanError
from autocompress.runtime.measure import file_size
from autocompress.transform.onnx_compact import compact_graph, drop_unused_initializers
from autocompress.transform.quantize.bn_fold import fold_batchnorm
from autocompress.transform.quantize.onnx_float import (
    _FUSION_PREFIX,
    _ONNX_TYPE_NAMES,
    _opset,
    export_float_onnx,
)
from autocompress.transform.quantize.qat import (
    _QUANT_CLASS,
    LearnedQuant,
    is_prepared,
    strip_fake_quant,
)
from autocompress.transform.quantize.scheme import (
    INT8_FULL_QMAX,
    QUANT_WEIGHT_BITS,
    WEIGHT_ONLY,
    _numpy_scales,
    weight_only_qmax,
    weight_qmax,
)

if TYPE_CHECKING:
    from autocompress.model.plan import CompressionPlan


_WEIGHT_QTYPE: dict[int, str] = {8: "QInt8", 4: "QInt4"}


_ACTIVATION_QTYPE: dict[int, str] = {8: "QUInt8", 16: "QUInt16"}


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


_QUANT_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
# The PTQ method that needs no calibration (``plan.CALIBRATION_METHODS``): ONNX Runtime's
# dynamic quantization, which has integer kernels for these ops (not Gemm).
DYNAMIC = "dynamic"
_DYNAMIC_OPS = ("MatMul", "Conv")


# Weightless ops ORT's QDQ quantizer handles. Between quantized layers they are quantized too,
# so the integer path is not broken by a float residual Add (each costs a DequantizeLinear in
# and a QuantizeLinear out): on ResNet-20 uniform int8, quantizing the convolutions alone ran
# at 0.94x of fp32 on an AVX2 machine, ORT's all-op PTQ of the same network at 0.66x.
_JOIN_OPS: tuple[str, ...] = (
    "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Relu", "Clip",
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
)


@dataclass(frozen=True)
class ExportInfo:
    """What export_onnx wrote: the file, per-layer weight types as stored, size, opset."""

    path: Path
    weight_types: dict[str, str]
    size_bytes: int
    opset: int
    int8_qmax: int = INT8_FULL_QMAX  # 63 when int8 weights were range-reduced (no VNNI)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "weight_types": dict(self.weight_types),
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "int8_qmax": self.int8_qmax,
        }


def _layer_of(initializer: str) -> str | None:
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
class _WeightSite:
    layer: str
    initializer: str
    node: str
    axis: int
    activation: str  # input tensor of the node
    output: str  # output tensor of the node


def _weight_sites(proto: onnx.ModelProto) -> list[_WeightSite]:
    initializers = {init.name for init in proto.graph.initializer}
    sites = []
    for node in proto.graph.node:
        if node.op_type not in _QUANT_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        layer = _layer_of(weight)
        if weight not in initializers or layer is None:
            continue
        sites.append(
            _WeightSite(layer, weight, node.name, _weight_axis(node), node.input[0], node.output[0])
        )
    return sites


def _gather_sites(proto: onnx.ModelProto) -> list[_WeightSite]:
    """Embedding lookups: a Gather whose table is a ``<layer>.weight`` initializer (axis 0:
    one scale per row)."""
    initializers = {init.name for init in proto.graph.initializer}
    return [
        _WeightSite(layer, node.input[0], node.name, 0, node.input[1], node.output[0])
        for node in proto.graph.node
        if node.op_type == "Gather" and node.input[0] in initializers
        and (layer := _layer_of(node.input[0])) is not None
    ]


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


def _quantize_file(
    float_path: Path,
    out_path: Path,
    calibration: Iterable[Any],
    layer_bits: dict[str, int] | None,
    *,
    activation_bits: int,
    learned: dict[str, LearnedQuant],
    weight_bits: int = 8,
    op_types: tuple[str, ...] | None = _QUANT_OPS,
    calibration_method: str = "minmax",
) -> dict[str, int]:
    """Pre-process and QDQ-quantize ``float_path``. ``layer_bits`` None means every layer at
    ``weight_bits``. Returns the bits actually requested per layer found in the graph."""
    from autocompress.transform.quantize import ort_tools as ort_quantize

    with tempfile.TemporaryDirectory(prefix="autocompress-q-") as tmp:
        pre_path, proto = _pre_processed(float_path, Path(tmp))
        initializers = {init.name: init for init in proto.graph.initializer}
        overrides: dict[str, list[dict[str, Any]]] = {}
        act_overrides: dict[str, dict[str, Any]] = {}
        act_ranges: dict[str, tuple[float, int]] = {}
        output_ranges: dict[str, tuple[float, int]] = {}
        nodes: list[str] = []
        requested: dict[str, int] = {}
        for site in _weight_sites(proto):
            bits = weight_bits if layer_bits is None else layer_bits.get(site.layer, 32)
            if bits >= 32:
                continue
            requested[site.layer] = bits
            nodes.append(site.node)
            layer_learned = learned.get(site.layer)
            qmax = layer_learned.weight_qmax if layer_learned else weight_qmax(bits)
            weight = numpy_helper.to_array(initializers[site.initializer])
            scales = _numpy_scales(weight, site.axis, qmax)
            overrides[site.initializer] = [
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
                act_ranges.setdefault(site.activation, layer_learned.input)
            if layer_learned.output is not None and site.initializer == f"{site.layer}.weight":
                # (A renamed weight means ORT fused something into the node, e.g. a BN the
                # PyTorch model still had: its output is then not the tensor QAT observed.)
                output_ranges[site.output] = layer_learned.output
        if layer_bits is not None and nodes:
            nodes += _integer_neighbours(proto, set(nodes))
        for tensor, qparams in output_ranges.items():
            act_ranges.setdefault(tensor, qparams)
        for tensor, (scale, zero_point) in act_ranges.items():
            act_overrides[tensor] = {"scale": scale, "zero_point": zero_point}
        if not nodes:
            shutil.copyfile(float_path, out_path)
            return requested
        ort_quantize.quantize_qdq(
            pre_path,
            out_path,
            calibration,
            activation_type=_ACTIVATION_QTYPE[activation_bits],
            weight_overrides=overrides,
            activation_overrides=act_overrides,
            nodes_to_quantize=nodes if layer_bits is not None else None,
            op_types=None if op_types is None else (*op_types, *_JOIN_OPS),
            calibration_method=calibration_method,
        )
        _finish_quantized(out_path)
    return requested


def _weight_only_file(
    float_path: Path, out_path: Path, layer_bits: dict[str, int], learned: dict[str, LearnedQuant],
    *, sites: Callable[[onnx.ModelProto], list[_WeightSite]] = _weight_sites,
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


def _dynamic_file(
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
        dynamic = {site.layer: site.node for site in _weight_sites(proto)
                   if layer_bits.get(site.layer) == 8 and op_of[site.node] in _DYNAMIC_OPS}
        middle = Path(tmp) / "dynamic.onnx"
        if dynamic:
            ort_quantize.quantize_dynamic(pre_path, middle,
                                          nodes_to_quantize=list(dynamic.values()))
        else:
            shutil.copyfile(pre_path, middle)
        rest = {k: b for k, b in layer_bits.items() if k not in dynamic}
        requested = _weight_only_file(middle, out_path, rest, learned)
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


def _check_realized(requested: dict[str, int], found: dict[str, str], path: Path) -> None:
    want = {8: "INT8", 4: "INT4"}
    for layer, bits in requested.items():
        if found.get(layer) != want[bits]:
            raise PlanError(
                f"layer {layer!r} was planned at {bits} bits but {path.name} stores it as "
                f"{found.get(layer, 'missing')}; set it to 32 bits or report this model"
            )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    plan: CompressionPlan,
    calibration: Iterable[Any],
    *,
    calibration_method: str = "minmax",
) -> ExportInfo:
    """Export ``model`` (float or prepare_qat) to QDQ ONNX with the plan's weight widths.

    Weights: per-channel symmetric INT8/INT4 with the fake-quant scales (max|w_c|/qmax of
    the final weights). Activations into quantized layers: the QAT observer ranges when the
    model was prepared and observed, otherwise calibrated by ORT on ``calibration`` (input
    batches, or (x, y) batches) with ``calibration_method`` (minmax, entropy, percentile;
    ``dynamic``: no calibration, see ``_dynamic_file``).
    Layers at 32 bits stay float. Every planned width is checked
    in the written file; returns what the file holds.
    """
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    float_model, learned = (
        strip_fake_quant(model) if is_prepared(model) else (copy.deepcopy(model), {})
    )
    modules = dict(float_model.named_modules())
    layer_bits: dict[str, int] = {}
    for layer, bits in plan.bits.items():
        if bits >= 32:
            continue
        if type(modules.get(layer)) not in _QUANT_CLASS:
            raise PlanError(
                f"plan quantizes {layer!r}, which is not a Conv/Linear layer of "
                "this model; check the name against the inventory"
            )
        layer_bits[layer] = bits
    float_model = fold_batchnorm(float_model.cpu().eval())
    # Embedding tables are weight-only in every file: integer rows dequantized in front of
    # the Gather, after the layers that compute are quantized the plan's way.
    tables = {k: b for k, b in layer_bits.items() if isinstance(modules[k], nn.Embedding)}
    computing = {k: b for k, b in layer_bits.items() if k not in tables}
    with tempfile.TemporaryDirectory(prefix="autocompress-x-") as tmp:
        float_path = export_float_onnx(float_model, example_input, Path(tmp) / "float.onnx")
        if not computing:
            shutil.copyfile(float_path, out_path)
            requested: dict[str, int] = {}
        elif calibration_method == DYNAMIC:
            requested = _dynamic_file(float_path, out_path, computing, learned)
        elif plan.activation_bits >= WEIGHT_ONLY:
            requested = _weight_only_file(float_path, out_path, computing, learned)
        else:
            requested = _quantize_file(
                float_path,
                out_path,
                calibration,
                computing,
                activation_bits=plan.activation_bits,
                learned=learned,
                calibration_method=calibration_method,
            )
        if tables:
            requested |= _weight_only_file(out_path, out_path, tables, learned,
                                           sites=_gather_sites)
    onnx.checker.check_model(str(out_path))
    found = onnx_weight_types(out_path)
    _check_realized({k: v for k, v in layer_bits.items() if k in requested}, found, out_path)
    missing = sorted(set(layer_bits) - set(requested))
    if missing:
        raise PlanError(
            f"planned layer(s) {missing} have no weight initializer in the exported "
            "graph (shared or computed weights?); set them to 32 bits"
        )
    int8_ranges = {
        learned[k].weight_qmax if k in learned else weight_qmax(8)
        for k, b in layer_bits.items()
        if b == 8
    }
    return ExportInfo(
        path=out_path,
        weight_types=found,
        size_bytes=file_size(out_path),
        opset=_opset(onnx.load(str(out_path), load_external_data=False)),
        int8_qmax=min(int8_ranges, default=INT8_FULL_QMAX),
    )


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
    _quantize_file(
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
        layer = _layer_of(name)
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
        layer = _layer_of(node.input[0])
        if layer is not None and node.input[1] in initializers:
            scales[layer] = numpy_helper.to_array(initializers[node.input[1]])
    return scales
