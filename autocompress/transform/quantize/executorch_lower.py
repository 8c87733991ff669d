"""A model lowered to an ExecuTorch program on the XNNPACK backend, at a plan's weight widths
where XNNPACK has kernels for them: the only module that imports ExecuTorch's compiler side
(``executorch.exir``, its XNNPACK partitioner and quantizer) and torchao's PT2E quantization.

Path: strip fake-quant -> fold BatchNorm -> ``torch.export`` -> PT2E (XNNPACK's quantizer,
annotating only the layers the plan quantizes) -> calibrate -> convert -> ``torch.export`` ->
``to_edge_transform_and_lower`` with the XNNPACK partitioner -> ``.pte``.

What XNNPACK offers (ExecuTorch 1.5): per-channel symmetric int8 weights for convolutions
and linear layers, with int8 activations (static, calibrated here) or activations quantized
at run time (dynamic); 4-bit per-channel weights only for linear layers (its ``qcint4`` tensors
are 2-D) with dynamic activations, and only with the range [-8, 7] (``quant_params.is_qc4w``).
A planned width with no kernel (an int4 convolution, any width but 8 or 4; an int8
convolution under run-time activations when a ReLU follows it, which XNNPACK's quantizer
does not annotate) leaves the layer float, and the record says so (``ProgramInfo.notes``):
the program holds what it holds.

The per-layer record is read back from the lowered program: the weight operand of every
convolution and linear node inside the XNNPACK delegates (the graph the delegate serialised),
so a layer PT2E quantized but XNNPACK did not take would show as not delegated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import PlanError, one_line
from autocompress.model.inventory import Inventory
from autocompress.runtime.executorch import TARGET
from autocompress.runtime.measure import file_size
from autocompress.transform.quantize.bn_fold import fold_batchnorm
from autocompress.transform.quantize.qat import is_prepared, strip_fake_quant

log = logging.getLogger("autocompress")

INT8, INT4, FLOAT = "INT8", "INT4", "FLOAT"  # the words onnx_weight_types uses
# Calibration images for static int8 activations: the PT2E observers run in eager mode at
# the program's batch, one call per chunk; 128 images fix a ResNet-20's ranges as well as 256.
MAX_CALIBRATION_IMAGES = 128
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_LAYER_OPS = ("aten.conv1d", "aten.conv2d", "aten.convolution", "aten.linear")


@dataclass(frozen=True)
class ProgramInfo:
    """What ``lower_program`` wrote: the ``.pte``, per-layer weight types as the XNNPACK
    delegates hold them, why a layer is not at its planned width, and the bytes."""

    path: Path
    weight_types: dict[str, str]
    activations: dict[str, str]  # layer -> "INT8" (static), "INT8-DYNAMIC" or "FLOAT"
    notes: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "weight_types": dict(self.weight_types),
                "activations": dict(self.activations), "notes": dict(self.notes),
                "size_bytes": self.size_bytes}


def lower_program(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    bits: Mapping[str, int] | None = None,
    calibration: Iterable[Any] = (),
    *,
    dynamic: bool = False,
) -> ProgramInfo:
    """Write ``model`` (float or prepare_qat) as an XNNPACK ExecuTorch program at ``path``
    for inputs shaped like ``example_input`` (its batch is the program's).

    ``bits``: layer -> planned weight width (layers at 32 or absent stay float). Static int8
    activations are calibrated on ``calibration`` (input batches or (x, y) batches);
    ``dynamic``: int8 layers quantize their activations at run time instead."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    float_model = strip_fake_quant(model)[0] if is_prepared(model) else copy.deepcopy(model)
    float_model = fold_batchnorm(float_model.cpu().eval())
    modules = dict(float_model.named_modules())
    widths, notes = _realisable(bits or {}, modules)
    example = example_input.detach().cpu()
    with torch.no_grad():
        exported = torch.export.export(float_model, (example,))
        if widths:
            exported = _quantized(exported, example, widths, calibration, dynamic)
        types, acts, loose = _lower(exported, out)
    for layer in loose:
        notes.setdefault(layer, "not delegated to XNNPACK: runs on ExecuTorch's portable kernels")
    weight_types = {name: types.get(name, FLOAT) for name in _layer_names(modules)}
    notes.update(_dropped(weight_types, widths, modules, dynamic))
    return ProgramInfo(out, weight_types, {k: acts.get(k, FLOAT) for k in weight_types},
                       notes, file_size(out))


def target_inventory(inventory: Inventory, model: nn.Module, target: str) -> Inventory:
    """The inventory a search on ``target`` chooses widths from: for executorch-xnnpack the
    layers XNNPACK quantizes (Conv/Linear) stay quantizable, and the others the per-layer
    space knows (LSTM/GRU/RNN, MultiheadAttention, Embedding) are excluded with the reason,
    since every program would hold them float (design rule 2: the space holds only what
    the target file can realise). Other targets: ``inventory`` unchanged."""
    if target != TARGET:
        return inventory
    modules = dict(model.named_modules())
    layers = [
        info if not info.quantizable or isinstance(modules.get(info.name), _LAYER_TYPES)
        else dataclasses.replace(info, quantizable=False, excluded_reason=(
            f"{info.type} is kept float on the {TARGET} target (XNNPACK quantizes "
            "Conv/Linear layers only)"))
        for info in inventory.layers
    ]
    return dataclasses.replace(inventory, layers=layers)


def _layer_names(modules: dict[str, nn.Module]) -> list[str]:
    return [name for name, m in modules.items() if isinstance(m, _LAYER_TYPES)]


def float_layers(model: nn.Module) -> dict[str, str]:
    """The record of an fp32 program: every Conv/Linear layer FLOAT."""
    return dict.fromkeys(_layer_names(dict(model.named_modules())), FLOAT)


def _realisable(bits: Mapping[str, int], modules: dict[str, nn.Module]
                ) -> tuple[dict[str, int], dict[str, str]]:
    """The planned widths XNNPACK can hold (layer -> 8 or 4), and a note for each planned
    width it cannot (those layers stay float)."""
    widths: dict[str, int] = {}
    notes: dict[str, str] = {}
    for layer, width in bits.items():
        if width >= 32:
            continue
        module = modules.get(layer)
        if module is None:
            raise PlanError(f"plan quantizes {layer!r}, which is not a layer of this model; "
                            "check the name against the inventory")
        if not isinstance(module, _LAYER_TYPES):
            notes[layer] = f"int{width} planned; kept float (XNNPACK quantizes Conv/Linear only)"
        elif width == 8:
            widths[layer] = 8
        elif width == 4 and isinstance(module, nn.Linear) and int4_linear_supported():
            widths[layer] = 4
        elif width == 4:
            notes[layer] = ("int4 planned; kept float (XNNPACK's 4-bit weights are 2-D: "
                            "linear layers only)" if not isinstance(module, nn.Linear) else
                            "int4 planned; kept float (this XNNPACK build has no 4-bit "
                            "linear kernel)")
        else:
            notes[layer] = f"int{width} planned; kept float (XNNPACK has no {width}-bit weights)"
    return widths, notes


def _configs(dynamic: bool) -> dict[int, Any]:
    """XNNPACK quantization configs by width: per-channel symmetric weights ([-127, 127] for
    int8: the plan's scheme, scale = max|w_c| / 127; [-8, 7] for int4: the only 4-bit range
    XNNPACK stores), int8 activations static (calibrated) or dynamic."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        get_symmetric_quantization_config,
    )

    return {
        8: get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic),
        4: get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True,
                                             weight_qmin=-8, weight_qmax=7),
    }


def _layer_of(node: Any) -> str | None:
    """The Conv/Linear module a graph node computes (None for other nodes)."""
    if node.op != "call_function" or not any(op in str(node.target) for op in _LAYER_OPS):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def _static_members(graph: Any, int8: set[str]) -> set[Any]:
    """Nodes a static int8 pattern may cover: the int8 layers, and every other computing
    node all of whose inputs come from covered nodes (the relu after an int8 conv, a
    residual add of two int8 branches). An add fed by a float layer stays float: the plan
    keeps that layer float, so nothing next to it is quantized either."""
    covered: set[Any] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        layer = _layer_of(node)
        if layer is not None:
            if layer in int8:
                covered.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a.op not in ("get_attr",)]
        if inputs and all(a in covered for a in inputs):
            covered.add(node)
    return covered


def _quantizer(graph: Any, widths: dict[str, int], dynamic: bool) -> Any:
    """One XNNPACK quantizer per (width, activation kind), each filtered to its layers."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantizer.composable_quantizer import ComposableQuantizer

    configs = _configs(dynamic)
    parts = []
    for width in sorted(set(widths.values()), reverse=True):
        layers = {k for k, b in widths.items() if b == width}
        members = (_static_members(graph, layers) if width == 8 and not dynamic else None)

        def keep(node: Any, layers: set[str] = layers, members: set[Any] | None = members
                 ) -> bool:
            layer = _layer_of(node)
            if layer is not None:
                return layer in layers
            if node.op != "call_function":
                return True  # weights, biases, inputs
            return members is not None and node in members

        quantizer = XNNPACKQuantizer().set_global(configs[width]).set_filter_function(keep)
        # BatchNorm is folded before capture, so the conv+BN patterns cannot match; skipping
        # them saves the seconds their pattern graphs take to trace on every lowering.
        quantizer.SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS
                                        if "_bn" not in p.name]
        parts.append(quantizer)
    return ComposableQuantizer(parts)


def _quantized(exported: Any, example: torch.Tensor, widths: dict[str, int],
               calibration: Iterable[Any], dynamic: bool) -> Any:
    """PT2E: annotate the planned layers, calibrate (static int8), convert, export again."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph_module = exported.module()
    prepared = prepare_pt2e(graph_module, _quantizer(graph_module.graph, widths, dynamic))
    for chunk in _chunks(calibration, example):
        prepared(chunk)
    prepared(example)  # dynamic-only plans observe weights only; one call fixes shapes
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,))


def _chunks(calibration: Iterable[Any], example: torch.Tensor) -> list[torch.Tensor]:
    """Calibration inputs at the program's batch (the captured graph's shapes are fixed),
    up to MAX_CALIBRATION_IMAGES. The batches are joined before they are cut, so batches
    smaller than the program's (a latency batch above the calibration batch) still all
    count; only a short last chunk is dropped."""
    batch, parts, held = example.shape[0], [], 0
    for item in calibration:
        if held >= MAX_CALIBRATION_IMAGES:
            break
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = torch.as_tensor(x).to(example.dtype)[:MAX_CALIBRATION_IMAGES - held]
        parts.append(x)
        held += x.shape[0]
    if not parts:
        return []
    joined = torch.cat(parts)
    return [joined[start:start + batch]
            for start in range(0, joined.shape[0] - batch + 1, batch)]


def _lower(exported: Any, out: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Lower to XNNPACK, write the program; per-layer weight and activation types as the
    delegates hold them, and the layers left outside every delegate."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    program = edge.exported_program()
    weights: dict[str, str] = {}
    acts: dict[str, str] = {}
    loose = [layer for node in program.graph.nodes if (layer := _layer_of(node)) is not None]
    for node in program.graph.nodes:
        if node.op == "get_attr":
            delegate = getattr(program.graph_module, str(node.target))
            original = getattr(delegate, "original_module", None)
            if original is not None:
                _read_types(original.graph, weights, acts)
    out.write_bytes(edge.to_executorch().buffer)
    return weights, acts, loose


def _read_types(graph: Any, weights: dict[str, str], acts: dict[str, str]) -> None:
    """Each delegated layer's weight type (a per-channel dequantize in front of its weight:
    [-8, 7] is XNNPACK's qcint4, else int8; a float parameter: FLOAT) and activation type
    (a dequantize in front of its input: INT8, dynamic when choose_qparams made the scale)."""
    for node in graph.nodes:
        layer = _layer_of(node)
        if layer is None:
            continue
        weight, source = node.args[1], node.args[0]
        if "dequantize_per_channel" in str(getattr(weight, "target", "")):
            weights[layer] = INT4 if int(weight.args[4]) == -8 else INT8
        else:
            weights[layer] = FLOAT
        if weights[layer] == FLOAT or "dequantize" not in str(getattr(source, "target", "")):
            acts[layer] = FLOAT  # a float layer computes in float whatever fed it
            continue
        scale = source.args[1]  # a getitem of choose_qparams when made at run time
        made = "choose_qparams" in str(getattr(getattr(scale, "args", [None])[0], "target", ""))
        acts[layer] = "INT8-DYNAMIC" if made else "INT8"


def _dropped(weight_types: dict[str, str], widths: dict[str, int],
             modules: dict[str, nn.Module], dynamic: bool) -> dict[str, str]:
    """A note for each layer whose realisable width the program does not hold: XNNPACK's
    quantizer quantizes a convolution dynamically only when no ReLU follows it, and it has no
    weight-only convolution, so under dynamic (or weight-only) activations such a layer
    stays float, and the trial says so."""
    want = {8: INT8, 4: INT4}
    notes = {}
    for layer, width in widths.items():
        if weight_types.get(layer) == want[width]:
            continue
        if dynamic and not isinstance(modules[layer], nn.Linear):
            why = ("XNNPACK quantizes convolutions with run-time (dynamic) activations only "
                   "without a ReLU after them, and has no weight-only convolution")
        else:
            why = "XNNPACK's quantizer or partitioner did not take it"
        notes[layer] = f"int{width} planned; kept float ({why})"
    return notes


@functools.lru_cache(maxsize=1)
def int4_linear_supported() -> bool:
    """Whether this ExecuTorch/XNNPACK build lowers a 4-bit per-channel linear layer and
    runs it (checked once per process on a 16x32 layer: lowering, delegate, numbers)."""
    import tempfile

    from executorch.runtime import Runtime

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(1, 32)
    try:
        with tempfile.TemporaryDirectory(prefix="autocompress-int4-") as tmp, torch.no_grad():
            exported = _quantized(torch.export.export(layer, (x,)), x, {"0": 4}, [x], True)
            types, _, loose = _lower(exported, Path(tmp) / "probe.pte")
            method = Runtime.get().load_program(Path(tmp) / "probe.pte").load_method("forward")
            got = method.execute([x])[0]
            want = layer(x)
        close = torch.allclose(got, want, atol=0.1 * float(want.abs().max()) + 1e-3)
        return types.get("0") == INT4 and not loose and bool(close)
    except Exception as exc:  # any failure of the probe means: no usable 4-bit linear here
        # ... but say which, so a build that lost its 4-bit kernel can be told from a bug here
        log.debug("4-bit linear probe failed, int4 linear layers stay float: %s",
                  one_line(exc, typed=True), exc_info=True)
        return False
