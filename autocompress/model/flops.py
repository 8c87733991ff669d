"""fvcore, the one place it is called: FLOPs of one forward, per module, with attention.

One multiply-add counts as one flop (fvcore's convention). fvcore has no formula for the
fused attention ops that PyTorch models run, so without the handles below a ViT's attention
(a third of its FLOPs) would silently count as zero:

- ``aten::scaled_dot_product_attention`` (F.scaled_dot_product_attention, training mode):
  Q @ K^T and softmax(.) @ V, ``B*H*L*S*(E + Ev)`` multiply-adds;
- ``aten::_native_multi_head_attention`` (nn.MultiheadAttention's inference fast path under
  no_grad): the same plus the q/k/v input projections and the output projection;
- ``aten::lstm``, ``aten::gru``, ``aten::rnn_tanh``, ``aten::rnn_relu`` (nn.LSTM, nn.GRU,
  nn.RNN, any layers and directions): every weight matrix once per time step and sequence,
  the gates' element-wise work left out like other activations (a model of LSTMs counted
  zero FLOPs, and its FLOP reduction was meaningless).

Ops still without a formula are returned by name and call count (``uncounted``), so callers
can say what the total leaves out instead of presenting it as complete.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Elementwise ops fvcore skips: next to matmuls and convolutions they are noise, so their
# absence is not worth a warning (the report still lists them in ``uncounted``).
ELEMENTWISE = frozenset({
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div",
    "aten::relu", "aten::relu_", "aten::gelu", "aten::silu", "aten::sigmoid", "aten::tanh",
    "aten::hardswish", "aten::hardswish_", "aten::hardsigmoid", "aten::softmax",
    "aten::dropout", "aten::unflatten", "aten::clamp", "aten::clamp_", "aten::neg",
    "aten::exp", "aten::sqrt", "aten::rsqrt", "aten::pow", "aten::mean", "aten::sum",
    "aten::max_pool2d", "aten::avg_pool2d", "aten::adaptive_avg_pool2d", "aten::hardtanh",
    "aten::hardtanh_", "aten::relu6", "aten::leaky_relu", "aten::cat", "aten::pad",
    "aten::constant_pad_nd", "aten::roll", "aten::fill_", "aten::zeros", "aten::ones",
    "aten::index", "aten::masked_fill", "aten::new_zeros", "aten::scatter",
    "aten::fake_quantize_per_tensor_affine", "aten::fake_quantize_per_channel_affine",
    "aten::fused_moving_avg_obs_fake_quant",
})


@dataclass
class FlopCounts:
    total: int
    by_module: dict[str, int]  # inclusive per module name ("" is the whole model)
    uncounted: dict[str, int] = field(default_factory=dict)  # op -> calls, no formula

    @property
    def heavy_uncounted(self) -> dict[str, int]:
        """Uncounted ops that are not elementwise: where a real gap may hide."""
        return {op: n for op, n in self.uncounted.items() if op not in ELEMENTWISE}


def _shape(value: Any) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    return [int(d) for d in shape] if shape is not None else []


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (_shape(inputs[i]) for i in range(3))
    if not q or not k or not v:
        return 0
    batch = math.prod(q[:-2])
    length, source, embed, value_embed = q[-2], k[-2], q[-1], v[-1]
    return batch * length * source * (embed + value_embed)


def _native_mha_flops(inputs: list[Any], outputs: list[Any]) -> int:
    q, k = _shape(inputs[0]), _shape(inputs[1])
    if len(q) != 3 or len(k) != 3:
        return 0
    batch, length, embed = q
    source = k[1]
    projections = batch * (length + 2 * source) * embed * embed + batch * length * embed * embed
    attention = 2 * batch * length * source * embed
    return projections + attention


def _recurrent_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of a recurrent op: (sequences x steps) x the sum of its weight matrices'
    sizes (the input and hidden weights of every layer and direction, projections too)."""
    x = _shape(inputs[0])
    # (input, hx, params[], ...), or packed (data, batch_sizes, hx, params[], ...); hx is a
    # list for an LSTM (of 3-D tensors when packed), a tensor otherwise: the weights are the
    # first list among the third and fourth inputs that holds matrices
    for value in inputs[2:4]:
        node = value.node()
        if node.kind() == "prim::ListConstruct":
            shapes = [_shape(v) for v in node.inputs()]
            if any(len(s) == 2 for s in shapes):
                per_step = sum(math.prod(s) for s in shapes if len(s) == 2)
                return math.prod(x[:-1]) * per_step if len(x) >= 2 else 0
    return 0


HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
    "aten::lstm": _recurrent_flops,
    "aten::gru": _recurrent_flops,
    "aten::rnn_tanh": _recurrent_flops,
    "aten::rnn_relu": _recurrent_flops,
}


def count(model: nn.Module, example_input: Any) -> FlopCounts:
    """fvcore counts for one forward of ``model`` on ``example_input`` (a tensor or a tuple
    of positional inputs), quietly: fvcore's and the tracer's warnings are returned as data
    (``uncounted``) or dropped. The model's train/eval mode is not changed here."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # fvcore traces with torch.jit, which warns about its own deprecation and about
            # data-dependent control flow; neither changes the counts.
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis  # lazy: heavy, and warns on import

            analysis = FlopCountAnalysis(model, inputs)
            analysis.set_op_handle(**HANDLES)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            return FlopCounts(
                total=int(analysis.total()),
                by_module={name: int(v) for name, v in analysis.by_module().items()},
                uncounted={str(k): int(v) for k, v in analysis.unsupported_ops().items()},
            )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def count_total(model: nn.Module, example_input: torch.Tensor) -> int:
    """Total FLOPs of one eval-mode forward under no_grad (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count(model, example_input).total
    finally:
        model.train(was_training)
