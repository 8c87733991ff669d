"""Export a model to ONNX by its plan: the float export, then the file the plan's widths ask
for (static QDQ, dynamic, or weight-only; embedding tables weight-only in every file;
recurrent layers as ``onnx_recurrent`` stores them), and the check that the written file
stores every planned width."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import nn

from autocompress.errors import PlanError
from autocompress.runtime.measure import file_size
from autocompress.transform.quantize.bn_fold import fold_batchnorm
from autocompress.transform.quantize.onnx_float import _opset, export_float_onnx
from autocompress.transform.quantize.onnx_inspect import (
    activation_types,
    gather_sites,
    layer_kernels,
    onnx_weight_types,
)
from autocompress.transform.quantize.onnx_qdq import dynamic_file, quantize_file
from autocompress.transform.quantize.onnx_recurrent import name_recurrent_weights, recurrent_file
from autocompress.transform.quantize.onnx_weight_only import weight_only_file
from autocompress.transform.quantize.qat import (
    _QUANT_CLASS,
    LearnedQuant,
    is_prepared,
    strip_fake_quant,
)
from autocompress.transform.quantize.qat_sequence import RECURRENT_TYPES, is_attention_output
from autocompress.transform.quantize.scheme import INT8_FULL_QMAX, WEIGHT_ONLY, weight_qmax

if TYPE_CHECKING:
    from autocompress.model.plan import CompressionPlan

# The PTQ method that needs no calibration (``plan.CALIBRATION_METHODS``): ONNX Runtime's
# dynamic quantization.
DYNAMIC = "dynamic"


@dataclass(frozen=True)
class ExportInfo:
    """What export_onnx wrote: the file, per-layer weight types as stored, size, opset."""

    path: Path
    weight_types: dict[str, str]
    size_bytes: int
    opset: int
    int8_qmax: int = INT8_FULL_QMAX  # 63 when int8 weights were range-reduced (no VNNI)
    # layer -> how the file runs it ("Gemm QDQ", "DynamicQuantizeLSTM", "GRU weight-only")
    kernels: dict[str, str] = field(default_factory=dict)
    # what activations are quantized to: ["UINT8"] asymmetric, ["INT8"] symmetric, [] none
    activation_types: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "weight_types": dict(self.weight_types),
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "int8_qmax": self.int8_qmax,
            "kernels": dict(self.kernels),
            "activation_types": list(self.activation_types),
        }


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
    ``dynamic``: no calibration, see ``onnx_qdq.dynamic_file``).
    Layers at 32 bits stay float. Every planned width is checked
    in the written file; returns what the file holds.
    """
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    float_model, learned = (
        strip_fake_quant(model) if is_prepared(model) else (copy.deepcopy(model), {})
    )
    modules = dict(float_model.named_modules())
    layer_bits = _planned_bits(plan, modules)
    float_model = fold_batchnorm(float_model.cpu().eval())
    # Embedding tables are weight-only in every file: integer rows dequantized in front of
    # the Gather, after the layers that compute are quantized the plan's way.
    tables = {k: b for k, b in layer_bits.items() if isinstance(modules[k], nn.Embedding)}
    recurrent = {k: b for k, b in layer_bits.items() if isinstance(modules[k], RECURRENT_TYPES)}
    computing = {k: b for k, b in layer_bits.items() if k not in tables and k not in recurrent}
    scheme = plan.activation_scheme
    with tempfile.TemporaryDirectory(prefix="autocompress-x-") as tmp:
        float_path = export_float_onnx(float_model, example_input, Path(tmp) / "float.onnx")
        if recurrent:
            name_recurrent_weights(float_path, float_model)
        requested = _write_planned(float_path, out_path, computing, learned, plan.activation_bits,
                                   calibration, calibration_method, scheme)
        if recurrent:
            requested |= recurrent_file(out_path, out_path, recurrent, learned,
                                        plan.activation_bits)
        if tables:
            requested |= weight_only_file(out_path, out_path, tables, learned,
                                          sites=gather_sites)
    return _checked(out_path, layer_bits, requested, learned)


def _planned_bits(plan: CompressionPlan, modules: dict[str, nn.Module]) -> dict[str, int]:
    """The plan's quantized layers (under 32 bits) and their widths; a layer that is not a
    Conv/Linear of the model is a PlanError."""
    layer_bits: dict[str, int] = {}
    for layer, bits in plan.bits.items():
        if bits >= 32:
            continue
        kind = type(modules.get(layer))
        if kind not in _QUANT_CLASS and kind not in (*RECURRENT_TYPES, nn.MultiheadAttention) \
                and not is_attention_output(modules, layer):
            raise PlanError(
                f"plan quantizes {layer!r}, which is not a Conv/Linear/LSTM/GRU/attention "
                "layer of this model; check the name against the inventory"
            )
        layer_bits[layer] = bits
    return layer_bits


def _write_planned(
    float_path: Path,
    out_path: Path,
    computing: dict[str, int],
    learned: dict[str, LearnedQuant],
    activation_bits: int,
    calibration: Iterable[Any],
    calibration_method: str,
    activation_scheme: str = "asymmetric",
) -> dict[str, int]:
    """Write the file for the computing layers' widths; the bits requested per layer."""
    if not computing:
        shutil.copyfile(float_path, out_path)
        return {}
    if calibration_method == DYNAMIC:
        return dynamic_file(float_path, out_path, computing, learned)
    if activation_bits >= WEIGHT_ONLY:
        return weight_only_file(float_path, out_path, computing, learned)
    return quantize_file(
        float_path,
        out_path,
        calibration,
        computing,
        activation_bits=activation_bits,
        learned=learned,
        calibration_method=calibration_method,
        activation_scheme=activation_scheme,
    )


def _checked(
    out_path: Path,
    layer_bits: dict[str, int],
    requested: dict[str, int],
    learned: dict[str, LearnedQuant],
) -> ExportInfo:
    """The written file checked (ONNX checker, every planned width stored as planned, no
    planned layer missing) and described."""
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
        kernels=layer_kernels(out_path),
        activation_types=activation_types(out_path),
    )


def _check_realized(requested: dict[str, int], found: dict[str, str], path: Path) -> None:
    want = {8: "INT8", 4: "INT4"}
    for layer, bits in requested.items():
        if found.get(layer) != want[bits]:
            raise PlanError(
                f"layer {layer!r} was planned at {bits} bits but {path.name} stores it as "
                f"{found.get(layer, 'missing')}; set it to 32 bits or report this model"
            )
