"""The float ONNX export every quantized file starts from (opset 21, parameter names kept)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from autocompress.errors import ModelSpecError
from autocompress.transform.onnx_compact import compact_graph
from autocompress.transform.quantize.qat import is_prepared, strip_fake_quant
from autocompress.transform.quantize.scheme import log

_ONNX_TYPE_NAMES: dict[int, str] = {
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.UINT4: "UINT4",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "FLOAT16",
    onnx.TensorProto.BFLOAT16: "BFLOAT16",
}


EXPORT_OPSET = 21  # first opset with native INT4/UINT16 QuantizeLinear/DequantizeLinear


_TORCHSCRIPT_OPSET = 20  # highest the TorchScript exporter supports; upgraded to 21 after


# ORT's optimizer renames a fused weight as e.g. "ConvBnFusion_W_layer1.0.conv1.weight".
_FUSION_PREFIX = re.compile(r"^[A-Za-z0-9]+Fusion_(?:W|B|BN_B)_")


def _output_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    with torch.no_grad():
        out = model(example_input)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, (tuple, list)):
        return [f"output{i}" for i in range(len(out))]
    raise ModelSpecError(
        f"model returns {type(out).__name__}; ONNX export needs a tensor (logits) output"
    )


def _export_torchscript(
    model: nn.Module, example_input: torch.Tensor, path: Path, outputs: list[str]
) -> None:
    # TorchScript exporter: ~15 ms for a small CNN and 0.5 s for resnet18 here, against
    # 2 s and 6 s for the dynamo exporter; it keeps parameter names as initializer names.
    # PRESERVE (model is in eval) stops it from folding BN itself, which would rename weights.
    dynamic = {"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example_input,),
            str(path),
            dynamo=False,
            opset_version=_TORCHSCRIPT_OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            input_names=["input"],
            output_names=outputs,
            dynamic_axes=dynamic,
        )


def _export_dynamo(
    model: nn.Module, example_input: torch.Tensor, path: Path, outputs: list[str]
) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        common: dict[str, Any] = {
            "dynamo": True,
            "opset_version": EXPORT_OPSET,
            "input_names": ["input"],
            "output_names": outputs,
            "verbose": False,
        }
        try:
            torch.onnx.export(
                model, (example_input,), str(path), dynamic_shapes=({0: batch},), **common
            )
        except Exception:
            # A model that specialises on the batch size: export it static.
            torch.onnx.export(model, (example_input,), str(path), **common)


def _restore_param_names(proto: onnx.ModelProto, model: nn.Module) -> int:
    """Rename initializers the exporter renamed (e.g. a Linear weight transposed for MatMul)
    back to their parameter names, matching by exact value (or exact transposed value)."""
    params = {name: p.detach().cpu().numpy() for name, p in model.named_parameters()}
    taken = {init.name for init in proto.graph.initializer} & set(params)
    by_digest: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for name, value in params.items():
        if name in taken:
            continue
        variants = [value] + ([value.T] if value.ndim == 2 else [])
        for variant in variants:
            key = (variant.shape, _digest(variant))
            by_digest.setdefault(key, []).append(name)
    renames: dict[str, str] = {}
    for init in proto.graph.initializer:
        if init.name in params:
            continue
        value = numpy_helper.to_array(init)
        if value.dtype != np.float32:
            continue
        candidates = by_digest.get((value.shape, _digest(value)), [])
        if len(candidates) == 1 and candidates[0] not in taken:
            renames[init.name] = candidates[0]
            taken.add(candidates[0])
    for init in proto.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return len(renames)


def _digest(value: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(value, dtype=np.float32).tobytes()).hexdigest()


def _upgrade_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    if _opset(proto) >= EXPORT_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, EXPORT_OPSET)
    except Exception as exc:  # converter raises RuntimeError/ValueError per op adapter
        # Still valid; ORT then writes INT4 Q/DQ in the com.microsoft domain.
        log.warning("could not upgrade the ONNX opset to %d (%s)", EXPORT_OPSET, exc)
        return proto


def _opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def export_float_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Float ONNX of ``model`` (eval mode, CPU) with a dynamic batch axis and opset 21.

    Input is named ``input``, the output ``output``; weight initializers are named after the
    parameters (``layer1.0.conv1.weight``). Checked with onnx.checker.
    """
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if is_prepared(model):
        model, _ = strip_fake_quant(model)
    export_model = copy.deepcopy(model).cpu().eval()
    example = example_input.detach().cpu()
    outputs = _output_names(export_model, example)
    try:
        _export_torchscript(export_model, example, out_path, outputs)
    except Exception as exc:  # exporter failures come as many types
        log.warning("TorchScript ONNX export failed (%s); trying the dynamo exporter", exc)
        try:
            _export_dynamo(export_model, example, out_path, outputs)
        except Exception as exc2:
            raise ModelSpecError(
                f"ONNX export of {type(model).__name__} failed ({str(exc2).splitlines()[0]}); "
                "the model must be traceable by torch.onnx.export"
            ) from exc2
    proto = onnx.load(str(out_path))
    proto = _upgrade_opset(proto)
    _restore_param_names(proto, export_model)
    compact_graph(proto)  # the fp32 reference pays the same (small) name overhead as the rest
    onnx.save(proto, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path
