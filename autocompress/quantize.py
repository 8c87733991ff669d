"""Fake-quant modules for QAT, BatchNorm folding, and export of a model to QDQ ONNX per plan.

Quantization scheme (the same in training and in the exported file):
- weights: symmetric, per output channel, ``scale = max|w_c| / qmax`` (int8: [-127, 127],
  int4: [-7, 7]), zero point 0. The scale is a function of the weights, so the scales
  "learned" in QAT are the ones recomputed from the fine-tuned weights at export; they go
  into the file through ORT's ``TensorQuantOverrides`` with ``axis`` set explicitly (without
  it ORT silently falls back to per-tensor int4: -6.7 pt on ResNet-20, design rule 3).
  On x86 CPUs without VNNI, int8 weights use [-63, 63]: ORT's u8s8 kernels there add pairs
  of uint8*int8 products in int16 and saturate (seen here: a digits CNN's first conv made
  the file disagree with its fake-quant twin on 7% of samples; with 7-bit weights, on
  none). That is ORT's documented ``reduce_range`` remedy; see int8_weight_qmax.
- activations: per-tensor affine uint8 (uint16 when ``plan.activation_bits == 16``) on the
  input and output of each quantized layer (where ORT's QDQ quantizer puts Q/DQ), ranges
  from EMA min/max observers frozen in eval. The ranges are carried into the file, so ONNX
  Runtime computes what QAT trained.
- layers at 32 bits: untouched, no weight or activation quantization of their own.
- weight-only (``plan.activation_bits == 32``): the same weights, no activation
  quantization; exported as integer initializers behind DequantizeLinear with float
  activations (no ORT quantizer involved). int8 then uses the full [-127, 127]: no integer
  kernel runs, so the u8s8 saturation cannot happen.

Export path: strip fake-quant -> fold BN -> float ONNX (TorchScript exporter, opset 20,
upgraded to 21 for native INT4 Q/DQ) -> ``quant_pre_process`` -> ``quantize_static`` (QDQ)
-> float logits and short tensor names (onnx_compact.py). All onnxruntime calls go through
runtime.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import logging
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from autocompress.errors import ConfigError, InputError, ModelSpecError, PlanError
from autocompress.measure import file_size
from autocompress.onnx_compact import compact_graph, drop_unused_initializers

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan

log = logging.getLogger(__name__)

QUANT_WEIGHT_BITS: tuple[int, ...] = (8, 4)
# Bumped whenever the same plan starts exporting to other bytes, so a study never compares
# sizes across layouts. 2: compact graphs (onnx_compact.py), up to a fifth smaller files.
# 3: weightless ops between quantized layers quantized too (_integer_neighbours).
ONNX_FORMAT = 3
INT8_FULL_QMAX = 127
INT8_REDUCED_QMAX = 63  # 2 * 255 * 64 < 32767: no int16 saturation in u8s8 pair sums
INT4_QMAX = 7
INT8_RANGE_ENV = "AUTOCOMPRESS_INT8_WEIGHT_RANGE"  # auto | full | reduced
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ACTIVATION_QMAX: dict[int, int] = {8: 255, 16: 65535}
WEIGHT_ONLY = 32  # plan.activation_bits meaning "quantize weights, keep activations float"
_WEIGHT_QTYPE: dict[int, str] = {8: "QInt8", 4: "QInt4"}
_ACTIVATION_QTYPE: dict[int, str] = {8: "QUInt8", 16: "QUInt16"}
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
}
_QUANT_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
# Weightless ops ORT's QDQ quantizer handles. Between quantized layers they are quantized too,
# so the integer path is not broken by a float residual Add (each costs a DequantizeLinear in
# and a QuantizeLinear out): on ResNet-20 uniform int8, quantizing the convolutions alone ran
# at 0.94x of fp32 on an AVX2 machine, ORT's all-op PTQ of the same network at 0.66x.
_JOIN_OPS: tuple[str, ...] = (
    "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Relu", "Clip",
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
)
# ORT's optimizer renames a fused weight as e.g. "ConvBnFusion_W_layer1.0.conv1.weight".
_FUSION_PREFIX = re.compile(r"^[A-Za-z0-9]+Fusion_(?:W|B|BN_B)_")
_EMA_MOMENTUM = 0.05  # fine-tunes here are a few hundred steps: a short memory is enough


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


# -- scales -------------------------------------------------------------------------------


def int8_weight_qmax() -> int:
    """Largest int8 weight magnitude to use on this machine: 127, or 63 without VNNI.

    ONNX Runtime's x86 u8s8 GEMM on AVX2/AVX-512 without VNNI sums pairs of uint8*int8
    products in int16 (``vpmaddubsw``) and saturates for large activations times large
    weights: the file then computes something else than what was trained. ORT documents
    ``reduce_range`` (7-bit weights) as the fix; we train and export on that grid. Set
    ``AUTOCOMPRESS_INT8_WEIGHT_RANGE=full`` to build for a VNNI/ARM target on such a machine.
    """
    setting = os.environ.get(INT8_RANGE_ENV, "auto").strip().lower()
    if setting == "full":
        return INT8_FULL_QMAX
    if setting == "reduced":
        return INT8_REDUCED_QMAX
    if setting != "auto":
        raise ConfigError(f"{INT8_RANGE_ENV}={setting!r} is not valid; use auto, full or reduced")
    return INT8_REDUCED_QMAX if _u8s8_saturates() else INT8_FULL_QMAX


@functools.cache
def _u8s8_saturates() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # ARM kernels widen before adding
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return not (_VNNI_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return True  # x86 with unknown flags: assume the conservative case


def weight_qmax(bits: int) -> int:
    """Symmetric weight range [-qmax, qmax] for a bit width (8: see int8_weight_qmax)."""
    if bits == 8:
        return int8_weight_qmax()
    if bits == 4:
        return INT4_QMAX
    raise PlanError(f"weight bit width {bits} cannot be quantized; use 8 or 4 (or 32)")


def weight_only_qmax(bits: int) -> int:
    """Weight range of a weight-only layer: the full range, since no integer kernel runs
    (ONNX Runtime dequantizes the weights to float), so u8s8 saturation cannot happen."""
    if bits not in (8, 4):
        raise PlanError(f"weight bit width {bits} cannot be quantized; use 8 or 4 (or 32)")
    return INT8_FULL_QMAX if bits == 8 else INT4_QMAX


def symmetric_scales(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-output-channel (dim 0) symmetric scale ``max|w_c| / qmax`` as float32, shape [C].

    An all-zero channel (e.g. pruned) gets scale 1: any scale represents zeros exactly and a
    tiny one would overflow the int32 bias ORT derives from ``input_scale * weight_scale``.
    """
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _numpy_scales(weight: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    """Same formula as symmetric_scales, on an ONNX initializer along its channel ``axis``."""
    moved = np.moveaxis(weight.astype(np.float32), axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    q = np.float32(qmax)
    safe = np.where(amax > 0, amax, q)  # zero channel -> scale 1
    return (safe / q).astype(np.float32)


def fake_quant_weight(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-channel symmetric fake-quant to [-qmax, qmax] with straight-through gradients."""
    scale = symmetric_scales(weight, qmax).to(weight.device)
    zero_point = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -qmax, qmax)


def fake_quant_per_tensor_weight(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-tensor symmetric fake-quant (the coarser scheme, kept for comparisons)."""
    amax = float(weight.detach().abs().max())
    scale = amax / qmax if amax > 0 else 1.0
    return torch.fake_quantize_per_tensor_affine(weight, scale, 0, -qmax, qmax)


def _affine_qparams(lo: float, hi: float, qmax: int) -> tuple[float, int]:
    """uint affine scale/zero point for range [lo, hi] widened to include 0 (as ORT does)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / qmax))
    if not scale > 0:
        return 1.0, 0
    zero_point = int(np.clip(round(-lo / scale), 0, qmax))
    return scale, zero_point


# -- fake-quant modules -------------------------------------------------------------------


class _FakeQuantMixin(nn.Module):
    """Adds weight and activation fake-quant to a Conv/Linear, keeping its param names.

    Instances are made from an existing layer by ``_from_float`` (same ``weight``/``bias``
    Parameters and attributes), so ``named_parameters`` and the exported initializer names
    stay ``<layer>.weight`` and plans keyed by layer name keep matching.

    Activations are fake-quantized where ONNX Runtime's QDQ quantizer will put Q/DQ pairs:
    on the layer input and on its output (ORT quantizes a quantized op's output too, so its
    int8 kernel can write uint8). ``quantize_output`` is False when the output goes to a
    BatchNorm (the file quantizes after the folded BN, which this module cannot see) or is
    a model output (export keeps logits float).
    """

    weight_bits: int
    weight_qmax: int
    activation_bits: int
    observing: bool
    quantize_output: bool
    _float_cls: type[nn.Module]
    _OBSERVER_BUFFERS = ("in_min", "in_max", "in_seen", "out_min", "out_max", "out_seen")
    _QUANT_ATTRS = (
        "_float_cls",
        "weight_bits",
        "weight_qmax",
        "activation_bits",
        "observing",
        "quantize_output",
    )

    @classmethod
    def _from_float(cls, layer: nn.Module, weight_bits: int, activation_bits: int) -> nn.Module:
        quant = cls.__new__(cls)
        quant.__dict__.update(layer.__dict__)
        # Own copies of the registries so the float layer and this one never alias state.
        for key in ("_parameters", "_buffers", "_modules"):
            quant.__dict__[key] = dict(layer.__dict__[key])
        quant._float_cls = type(layer)
        quant.weight_bits = weight_bits
        # fixed now: export must use the same
        quant.weight_qmax = (
            weight_qmax(weight_bits) if activation_bits < WEIGHT_ONLY
            else weight_only_qmax(weight_bits)
        )
        quant.activation_bits = activation_bits
        quant.observing = False
        quant.quantize_output = True
        device = layer.weight.device
        for side in ("in", "out"):
            quant.register_buffer(f"{side}_min", torch.zeros((), device=device))
            quant.register_buffer(f"{side}_max", torch.zeros((), device=device))
            quant.register_buffer(f"{side}_seen", torch.zeros((), dtype=torch.bool, device=device))
        return quant

    def _to_float(self) -> nn.Module:
        layer = self._float_cls.__new__(self._float_cls)
        layer.__dict__.update(self.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[key] = dict(self.__dict__[key])
        for name in self._OBSERVER_BUFFERS:
            layer._buffers.pop(name, None)
        for name in self._QUANT_ATTRS:
            layer.__dict__.pop(name, None)
        return layer

    def weight_scale(self) -> torch.Tensor:
        """Current per-output-channel weight scales, shape [out_channels]."""
        return symmetric_scales(self.weight, self.weight_qmax)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.weight_qmax)

    def activation_qparams(self) -> tuple[float, int] | None:
        """(scale, zero_point) of the input activation, or None before any observation."""
        return self._qparams("in")

    def output_qparams(self) -> tuple[float, int] | None:
        """(scale, zero_point) of the output, or None if not observed / not quantized."""
        return self._qparams("out") if self.quantize_output else None

    def _qparams(self, side: str) -> tuple[float, int] | None:
        if self.activation_bits >= WEIGHT_ONLY or not bool(getattr(self, f"{side}_seen")):
            return None
        lo, hi = float(getattr(self, f"{side}_min")), float(getattr(self, f"{side}_max"))
        return _affine_qparams(lo, hi, ACTIVATION_QMAX[self.activation_bits])

    @torch.no_grad()
    def _observe(self, side: str, x: torch.Tensor) -> None:
        lo_buf, hi_buf = getattr(self, f"{side}_min"), getattr(self, f"{side}_max")
        seen = getattr(self, f"{side}_seen")
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not bool(seen):
            lo_buf.copy_(lo)
            hi_buf.copy_(hi)
            seen.fill_(True)
        else:
            lo_buf.add_(_EMA_MOMENTUM * (lo - lo_buf))
            hi_buf.add_(_EMA_MOMENTUM * (hi - hi_buf))

    def _fake_quant(self, side: str, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits >= WEIGHT_ONLY:
            return x  # weight-only: activations stay float
        # Observers learn in train mode (and in calibrate()); eval mode uses frozen ranges.
        if self.training or self.observing:
            self._observe(side, x)
        qparams = self._qparams(side)
        if qparams is None:
            return x  # never observed: nothing to simulate yet (export then calibrates)
        scale, zero_point = qparams
        return torch.fake_quantize_per_tensor_affine(
            x, scale, zero_point, 0, ACTIVATION_QMAX[self.activation_bits]
        )

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant("in", x)

    def _quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return self._fake_quant("out", y) if self.quantize_output else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.weight_bits}a{self.activation_bits}"


class _QuantConvForward(_FakeQuantMixin):
    """One forward for every convolution rank; ``_conv_forward`` comes from nn.ConvNd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return self._quantize_output(self._conv_forward(x, self.quantized_weight(), self.bias))


class QuantConv1d(_QuantConvForward, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvForward, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvForward, nn.Conv3d):
    pass


class QuantLinear(_FakeQuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return self._quantize_output(F.linear(x, self.quantized_weight(), self.bias))


_QUANT_CLASS: dict[type[nn.Module], type[_FakeQuantMixin]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def prepare_qat(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """A copy of ``model`` with fake-quant on every layer the plan puts below 32 bits.

    Module and parameter names are unchanged. Layers at 32 bits (or absent from the plan)
    are left as they are, activations included.
    """
    prepared = copy.deepcopy(model)
    modules = dict(prepared.named_modules())
    for layer, bits in sorted(plan.bits.items()):
        if bits >= 32:
            continue
        module = modules.get(layer)
        if module is None:
            raise PlanError(
                f"plan quantizes layer {layer!r}, which is not in the model; "
                "check the name against the inventory"
            )
        if isinstance(module, _FakeQuantMixin):
            raise PlanError(
                f"layer {layer!r} is already fake-quantized; call prepare_qat on the float model"
            )
        quant_cls = _QUANT_CLASS.get(type(module))
        if quant_cls is None:
            raise PlanError(
                f"layer {layer!r} is a {type(module).__name__}; only Conv1d/2d/3d and Linear "
                "layers can be quantized, set it to 32 bits"
            )
        _set_module(prepared, layer, quant_cls._from_float(module, bits, plan.activation_bits))
    _mark_unquantized_outputs(prepared)
    return prepared


def _mark_unquantized_outputs(model: nn.Module) -> None:
    """Switch off output fake-quant where the file will not quantize that exact tensor.

    A layer feeding a BatchNorm: export folds the BN, so the file quantizes the post-BN
    tensor (ORT then calibrates it). A layer whose output is a model output: export keeps
    the logits float. If torch.fx cannot trace the model, outputs stay quantized.
    """
    graph = _trace(model)
    if graph is None:
        return
    modules = dict(model.named_modules())
    skip: set[str] = set()
    for node in graph.nodes:
        if node.op == "output":
            for arg in _flatten_args(node.args):
                if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
                    skip.add(str(arg.target))
        elif node.op == "call_module" and isinstance(
            modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm
        ):
            source = node.args[0] if node.args else None
            if isinstance(source, torch.fx.Node) and source.op == "call_module":
                skip.add(str(source.target))
    for name in skip:
        module = modules.get(name)
        if isinstance(module, _FakeQuantMixin):
            module.quantize_output = False


def _flatten_args(args: Any) -> list[Any]:
    if isinstance(args, (tuple, list)):
        return [leaf for item in args for leaf in _flatten_args(item)]
    if isinstance(args, dict):
        return [leaf for item in args.values() for leaf in _flatten_args(item)]
    return [args]


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    try:
        return _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("torch.fx cannot trace %s (%s)", type(model).__name__, first_line)
        return None


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, _FakeQuantMixin) for m in model.modules())


@dataclass(frozen=True)
class LearnedQuant:
    """What QAT fixed for one layer: its weight range and activation quant parameters."""

    weight_qmax: int
    input: tuple[float, int] | None  # (scale, zero_point); None if never observed
    output: tuple[float, int] | None  # None if not observed or not quantized


def strip_fake_quant(model: nn.Module) -> tuple[nn.Module, dict[str, LearnedQuant]]:
    """Float copy of a prepare_qat model plus what each fake-quant layer learned."""
    stripped = copy.deepcopy(model)
    learned: dict[str, LearnedQuant] = {}
    for name, module in list(stripped.named_modules()):
        if isinstance(module, _FakeQuantMixin):
            learned[name] = LearnedQuant(
                module.weight_qmax, module.activation_qparams(), module.output_qparams()
            )
            _set_module(stripped, name, module._to_float())
    return stripped, learned


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], *, max_batches: int = 8) -> nn.Module:
    """Set the activation observers of a prepare_qat model from data, without training.

    Runs in eval mode (BatchNorm statistics untouched) with observers switched on. The first
    batch sets the range, later ones move it by EMA. Returns the model (modified in place).
    """
    quant_modules = [m for m in model.modules() if isinstance(m, _FakeQuantMixin)]
    was_training = model.training
    model.eval()
    for m in quant_modules:
        m.observing = True
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for m in quant_modules:
            m.observing = False
        model.train(was_training)
    return model


# -- BatchNorm folding --------------------------------------------------------------------

_FOLDABLE: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
    nn.Linear: (nn.BatchNorm1d,),
}


class _LeafTracer(torch.fx.Tracer):
    """Keeps fake-quant layers as leaves so their Conv+BN pairs can be folded too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _FakeQuantMixin) or super().is_leaf_module(m, module_qualified_name)


def _float_type(module: nn.Module) -> type[nn.Module]:
    return module._float_cls if isinstance(module, _FakeQuantMixin) else type(module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with each Conv->BatchNorm pair folded into the conv and the BN made Identity.

    Only pairs where the conv output feeds the BN alone and neither module is called twice
    are folded; names are unchanged (the BN stays as an ``nn.Identity`` under its name) so
    plan keys still match. Per-channel symmetric weight quantization commutes with the
    per-channel BN scale, so folding a fake-quant conv keeps its quantization grid.
    If the model cannot be traced by torch.fx, the copy is returned unfolded.
    """
    folded = copy.deepcopy(model)
    graph = _trace(folded)
    if graph is None:
        log.warning("fold_batchnorm: BatchNorm left unfolded in %s", type(model).__name__)
        return folded
    modules = dict(folded.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        bn = modules.get(str(node.target))
        source = node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(
            source, torch.fx.Node
        ):
            continue
        if source.op != "call_module" or len(source.users) != 1:
            continue
        conv = modules.get(str(source.target))
        if conv is None or type(bn) not in _FOLDABLE.get(_float_type(conv), ()):
            continue
        if calls[source.target] != 1 or calls[node.target] != 1 or bn.running_mean is None:
            continue
        pairs.append((str(source.target), str(node.target)))
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        was_training = conv.training
        fused = _fuse(conv.eval(), bn.eval())
        fused.train(was_training)
        _set_module(folded, conv_name, fused)
        identity = nn.Identity()
        identity.train(bn.training)
        _set_module(folded, bn_name, identity)
    return folded


def _fuse(layer: nn.Module, bn: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    if issubclass(_float_type(layer), nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    return fuse_conv_bn_eval(layer, bn)


# -- ONNX export ----------------------------------------------------------------------------


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
) -> dict[str, int]:
    """Pre-process and QDQ-quantize ``float_path``. ``layer_bits`` None means every layer at
    ``weight_bits``. Returns the bits actually requested per layer found in the graph."""
    from autocompress import runtime

    with tempfile.TemporaryDirectory(prefix="autocompress-q-") as tmp:
        pre_path = runtime.pre_process(float_path, Path(tmp) / "pre.onnx")
        proto = onnx.load(str(pre_path))
        _name_nodes(proto)
        onnx.save(proto, str(pre_path))
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
        runtime.quantize_qdq(
            pre_path,
            out_path,
            calibration,
            activation_type=_ACTIVATION_QTYPE[activation_bits],
            weight_overrides=overrides,
            activation_overrides=act_overrides,
            nodes_to_quantize=nodes if layer_bits is not None else None,
            op_types=None if op_types is None else (*op_types, *_JOIN_OPS),
        )
        _finish_quantized(out_path)
    return requested


def _weight_only_file(
    float_path: Path, out_path: Path, layer_bits: dict[str, int], learned: dict[str, LearnedQuant]
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
    for site in _weight_sites(proto):
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
) -> ExportInfo:
    """Export ``model`` (float or prepare_qat) to QDQ ONNX with the plan's weight widths.

    Weights: per-channel symmetric INT8/INT4 with the fake-quant scales (max|w_c|/qmax of
    the final weights). Activations into quantized layers: the QAT observer ranges when the
    model was prepared and observed, otherwise calibrated by ORT on ``calibration`` (input
    batches, or (x, y) batches). Layers at 32 bits stay float. Every planned width is checked
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
    with tempfile.TemporaryDirectory(prefix="autocompress-x-") as tmp:
        float_path = export_float_onnx(float_model, example_input, Path(tmp) / "float.onnx")
        if not layer_bits:
            shutil.copyfile(float_path, out_path)
            requested: dict[str, int] = {}
        elif plan.activation_bits >= WEIGHT_ONLY:
            requested = _weight_only_file(float_path, out_path, layer_bits, learned)
        else:
            requested = _quantize_file(
                float_path,
                out_path,
                calibration,
                layer_bits,
                activation_bits=plan.activation_bits,
                learned=learned,
            )
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
    )
    onnx.checker.check_model(str(out_path))
    return out_path


def ptq_dynamic(float_onnx: str | Path, out: str | Path) -> Path:
    """ORT dynamic quantization (int8 weights, activations quantized at run time)."""
    from autocompress import runtime

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autocompress-d-") as tmp:
        pre_path = runtime.pre_process(float_onnx, Path(tmp) / "pre.onnx")
        runtime.quantize_dynamic(pre_path, out_path, weight_type="QInt8")
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
