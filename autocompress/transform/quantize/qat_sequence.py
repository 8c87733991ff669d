"""Fake-quant for the layers whose weights their forward reads by attribute: nn.LSTM, nn.GRU
and nn.RNN (one width for every weight matrix of the module), and nn.MultiheadAttention (its
input projection, named by the module, and its ``out_proj``, each with its own width).

Weights only: their activations are not simulated. What the file does with them:
- LSTM at 8 bits with quantized activations: ONNX Runtime's ``DynamicQuantizeLSTM`` (int8
  weights, per row of each gate, activations quantized at run time); its scales are ORT's
  own ``max|w_row| / 127`` (``/ 64`` with reduce_range), which is what is simulated here.
- LSTM at 4 bits or with float activations, GRU and RNN at any width: weight-only (integer
  W and R behind DequantizeLinear; ORT has no integer GRU kernel), per row, full range.
- attention projections: MatMul/Gemm nodes like any Linear, quantized the plan's way (QDQ
  with calibrated activations, dynamic, or weight-only).

The modules keep their class's parameters and names (``lstm.weight_ih_l0``,
``attn.in_proj_weight``), so a state_dict loads into the float model and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from autocompress.transform.quantize.scheme import (
    WEIGHT_ONLY,
    fake_quant_weight,
    recurrent_weight_qmax,
    weight_only_qmax,
    weight_qmax,
)

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
# The input projection's parameters: packed, or separate when kdim/vdim differ.
_IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def lstm_is_dynamic(module: nn.Module, bits: int, activation_bits: int) -> bool:
    """Whether the file runs this recurrent layer on ORT's integer LSTM kernel."""
    return isinstance(module, nn.LSTM) and bits == 8 and activation_bits < WEIGHT_ONLY


class _SequenceFakeQuant(nn.Module):
    """Marker and float round trip of the modules here (made by ``__dict__`` copy, like the
    Conv/Linear fake-quant layers, so parameters are shared, not copied)."""

    _float_cls: type[nn.Module]
    _QUANT_ATTRS: tuple[str, ...] = ("_float_cls",)

    def _adopt(self, layer: nn.Module) -> None:
        self.__dict__.update(layer.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            self.__dict__[key] = dict(layer.__dict__[key])
        self._float_cls = type(layer)

    def _to_float(self) -> nn.Module:
        layer = self._float_cls.__new__(self._float_cls)
        layer.__dict__.update(self.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            layer.__dict__[key] = dict(self.__dict__[key])
        for name in self._QUANT_ATTRS:
            layer.__dict__.pop(name, None)
        return layer

    def learned_qmax(self) -> dict[str, int]:
        """Layer-name suffix ("" for the module itself) -> weight qmax used."""
        raise NotImplementedError

    def quantized_parameters(self) -> dict[str, torch.Tensor]:
        """Parameter name (relative to this module, e.g. ``weight_ih_l0``,
        ``out_proj.weight``) -> its fake-quantized value, for each weight the forward
        quantizes: what a frozen float copy must hold to compute what this module does."""
        raise NotImplementedError


class _QuantRecurrent(_SequenceFakeQuant):
    """Every ``weight_*`` matrix fake-quantized per row (one scale per gate unit)."""

    weight_bits: int
    weight_qmax: int
    _QUANT_ATTRS = ("_float_cls", "weight_bits", "weight_qmax")

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, activation_bits: int) -> nn.Module:
        quant = cls.__new__(cls)
        quant._adopt(layer)
        # RNNBase.forward reads this list, not the attributes: own copy, same Parameters.
        quant.__dict__["_flat_weights"] = list(layer.__dict__["_flat_weights"])
        quant.weight_bits = bits
        quant.weight_qmax = recurrent_weight_qmax(
            bits, dynamic=lstm_is_dynamic(layer, bits, activation_bits))
        return quant

    def learned_qmax(self) -> dict[str, int]:
        return {"": self.weight_qmax}

    def quantized_parameters(self) -> dict[str, torch.Tensor]:
        return {name: fake_quant_weight(getattr(self, name), self.weight_qmax)
                for name in self._flat_weights_names
                if name.startswith("weight") and getattr(self, name, None) is not None}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        saved = self._flat_weights
        self.__dict__["_flat_weights"] = [
            fake_quant_weight(w, self.weight_qmax)
            if w is not None and name.startswith("weight") else w
            for name, w in zip(self._flat_weights_names, saved, strict=True)
        ]
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.__dict__["_flat_weights"] = saved

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w{self.weight_bits}"


class QuantLSTM(_QuantRecurrent, nn.LSTM):
    pass


class QuantGRU(_QuantRecurrent, nn.GRU):
    pass


class QuantRNN(_QuantRecurrent, nn.RNN):
    pass


class QuantMultiheadAttention(_SequenceFakeQuant, nn.MultiheadAttention):
    """Input projection at ``in_bits``, ``out_proj`` at ``out_bits`` (32: float)."""

    in_bits: int
    out_bits: int
    in_qmax: int
    out_qmax: int
    _QUANT_ATTRS = ("_float_cls", "in_bits", "out_bits", "in_qmax", "out_qmax")

    @classmethod
    def from_float(cls, layer: nn.MultiheadAttention, in_bits: int, out_bits: int,
                   activation_bits: int) -> nn.Module:
        quant = cls.__new__(cls)
        quant._adopt(layer)
        qmax = weight_qmax if activation_bits < WEIGHT_ONLY else weight_only_qmax
        quant.in_bits, quant.out_bits = in_bits, out_bits
        quant.in_qmax = qmax(in_bits) if in_bits < 32 else 0
        quant.out_qmax = qmax(out_bits) if out_bits < 32 else 0
        return quant

    def learned_qmax(self) -> dict[str, int]:
        return {suffix: q for suffix, q in (("", self.in_qmax), (".out_proj", self.out_qmax))
                if q}

    def quantized_parameters(self) -> dict[str, torch.Tensor]:
        params = self._parameters
        quantized = {key: fake_quant_weight(params[key], self.in_qmax) for key in _IN_PROJ
                     if self.in_qmax and params.get(key) is not None}
        if self.out_qmax:
            quantized["out_proj.weight"] = fake_quant_weight(self.out_proj.weight,
                                                             self.out_qmax)
        return quantized

    @contextmanager
    def _quantized_weights(self) -> Iterator[None]:
        # MultiheadAttention.forward reads these by attribute (F.multi_head_attention_forward
        # gets out_proj.weight, not the out_proj module): swap in fake-quantized tensors.
        params, out_params = self._parameters, self.out_proj._parameters
        saved = {k: params[k] for k in _IN_PROJ if params.get(k) is not None}
        saved_out = out_params["weight"]
        try:
            if self.in_qmax:
                for key, weight in saved.items():
                    params[key] = fake_quant_weight(weight, self.in_qmax)
            if self.out_qmax:
                out_params["weight"] = fake_quant_weight(saved_out, self.out_qmax)
            yield
        finally:
            params.update(saved)
            out_params["weight"] = saved_out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._quantized_weights():
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in w{self.in_bits}, out w{self.out_bits}"


RECURRENT_QUANT: dict[type[nn.Module], type[_QuantRecurrent]] = {
    nn.LSTM: QuantLSTM,
    nn.GRU: QuantGRU,
    nn.RNN: QuantRNN,
}


def is_attention_output(modules: dict[str, nn.Module], name: str) -> bool:
    """``name`` is the ``out_proj`` of a MultiheadAttention (quantized through its parent)."""
    parent, _, leaf = name.rpartition(".")
    return leaf == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention)


def quantizable_sequence_layer(module: nn.Module) -> str | None:
    """Why this recurrent/attention module cannot be quantized, or None if it can."""
    if isinstance(module, nn.LSTM) and module.proj_size > 0:
        return "an LSTM with proj_size is not quantized (its ONNX export has no projection)"
    return None


def prepare_sequence_layers(prepared: nn.Module, bits: dict[str, int], activation_bits: int,
                            set_module: Any) -> set[str]:
    """Swap the plan's recurrent and attention layers of ``prepared`` for fake-quant ones
    (``bits``: layer -> width under 32); the layer names handled."""
    modules = dict(prepared.named_modules())
    done: set[str] = set()
    for name, width in bits.items():
        module = modules.get(name)
        if type(module) in RECURRENT_QUANT:
            set_module(prepared, name, RECURRENT_QUANT[type(module)].from_float(
                module, width, activation_bits))
            done.add(name)
    attentions = {name for name in bits if type(modules.get(name)) is nn.MultiheadAttention}
    attentions |= {name.rpartition(".")[0] for name in bits
                   if is_attention_output(modules, name)}
    for name in sorted(attentions):
        module = modules[name]
        if type(module) is not nn.MultiheadAttention:
            continue
        in_bits = bits.get(name, 32)
        out_bits = bits.get(f"{name}.out_proj", 32)
        set_module(prepared, name, QuantMultiheadAttention.from_float(
            module, in_bits, out_bits, activation_bits))
        done |= {n for n in (name, f"{name}.out_proj") if n in bits}
    return done
