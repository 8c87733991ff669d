"""Fake-quant modules for QAT: prepare_qat, observers, calibration, stripping."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import PlanError
from autocompress.transform.quantize.qat_sequence import (
    _SequenceFakeQuant,
    prepare_sequence_layers,
)
from autocompress.transform.quantize.scheme import (
    _EMA_MOMENTUM,
    WEIGHT_ONLY,
    activation_qparams,
    activation_range,
    fake_quant_weight,
    symmetric_scales,
    warn_once,
    weight_only_qmax,
    weight_qmax,
)

if TYPE_CHECKING:
    from autocompress.model.plan import CompressionPlan


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
    activation_scheme: str
    observing: bool
    quantize_output: bool
    _float_cls: type[nn.Module]
    _OBSERVER_BUFFERS = ("in_min", "in_max", "in_seen", "out_min", "out_max", "out_seen")
    _QUANT_ATTRS = (
        "_float_cls",
        "weight_bits",
        "weight_qmax",
        "activation_bits",
        "activation_scheme",
        "observing",
        "quantize_output",
    )

    @classmethod
    def _from_float(cls, layer: nn.Module, weight_bits: int, activation_bits: int,
                    activation_scheme: str = "asymmetric") -> nn.Module:
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
        quant.activation_scheme = activation_scheme
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
        return activation_qparams(lo, hi, self.activation_bits, self._scheme())

    def activation_int_range(self) -> tuple[int, int]:
        """Integer range [qmin, qmax] activations are clamped to (uint8 [0, 255] asymmetric,
        int8 [-128, 127] symmetric, ...)."""
        return activation_range(self.activation_bits, self._scheme())

    def _scheme(self) -> str:
        # Layers prepared before activation schemes existed (pickled models) are asymmetric.
        return getattr(self, "activation_scheme", "asymmetric")

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
        qmin, qmax = self.activation_int_range()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

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


class QuantEmbedding(_FakeQuantMixin, nn.Embedding):
    """Weight-only: each row (one token's vector) has its own scale; the looked-up vectors
    stay float (the file dequantizes the table in front of its Gather)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


_QUANT_CLASS: dict[type[nn.Module], type[_FakeQuantMixin]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def prepare_qat(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """A copy of ``model`` with fake-quant on every layer the plan puts below 32 bits.

    Module and parameter names are unchanged. Layers at 32 bits (or absent from the plan)
    are left as they are, activations included. Recurrent and attention layers get
    weight fake-quant (``qat_sequence``).
    """
    prepared = copy.deepcopy(model)
    planned = {layer: bits for layer, bits in plan.bits.items() if bits < 32}
    done = prepare_sequence_layers(prepared, planned, plan.activation_bits, _set_module)
    modules = dict(prepared.named_modules())
    scheme = plan.activation_scheme
    for layer, bits in sorted(planned.items()):
        if layer in done:
            continue
        module = modules.get(layer)
        if module is None:
            raise PlanError(
                f"plan quantizes layer {layer!r}, which is not in the model; "
                "check the name against the inventory"
            )
        if isinstance(module, (_FakeQuantMixin, _SequenceFakeQuant)):
            raise PlanError(
                f"layer {layer!r} is already fake-quantized; call prepare_qat on the float model"
            )
        quant_cls = _QUANT_CLASS.get(type(module))
        if quant_cls is None:
            raise PlanError(
                f"layer {layer!r} is a {type(module).__name__}; only Conv1d/2d/3d, Linear, "
                "Embedding, LSTM/GRU/RNN and MultiheadAttention layers can be quantized, set "
                "it to 32 bits"
            )
        # an embedding table is looked up, not multiplied: its weights only
        activation_bits = WEIGHT_ONLY if quant_cls is QuantEmbedding else plan.activation_bits
        _set_module(prepared, layer,
                    quant_cls._from_float(module, bits, activation_bits, scheme))
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
        warn_once(f"torch.fx cannot trace {type(model).__name__} ({first_line}): BatchNorm "
                  "stays unfolded and the output layer's fake-quant is kept")
        return None


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, (_FakeQuantMixin, _SequenceFakeQuant)) for m in model.modules())


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
        elif isinstance(module, _SequenceFakeQuant):
            for suffix, qmax in module.learned_qmax().items():
                learned[name + suffix] = LearnedQuant(qmax, None, None)
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


class _LeafTracer(torch.fx.Tracer):
    """Keeps fake-quant layers as leaves so their Conv+BN pairs can be folded too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (_FakeQuantMixin, _SequenceFakeQuant)) or super().is_leaf_module(
            m, module_qualified_name)
