"""The guide's comparison metrics, defined once for every reader (search table, ``show``,
``--json``, the dashboard and the export report).

- accuracy-drop rate = (original - compressed) / original accuracy (fp32 baseline trial)
- FLOP-reduction rate = (original - compressed) / original fvcore FLOPs. FLOPs count
  operations, not their precision, so quantization alone reduces them by 0%;
- bit-operations (BOPs) = sum over Conv/Linear layers of MACs x weight bits x activation
  bits, which is what mixed precision saves (Baskin et al. 2021; van Baalen et al. 2020):
  an int8 layer with uint8 activations costs 64 per MAC, a float one 1,024, an int4
  weight-only layer (float activations) 128.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autocompress.model.plan import CompressionPlan
    from autocompress.study.records import TrialRecord

FLOAT_BITS = 32


def reduction_rate(original: float | None, compressed: float | None) -> float | None:
    """(original - compressed) / original; None when either is missing or original is 0."""
    if original is None or compressed is None or not original:
        return None
    return (float(original) - float(compressed)) / float(original)


def accuracy_drop_rate(fp32_accuracy: float | None, accuracy: float | None) -> float | None:
    """The guide's accuracy-drop rate: the share of the fp32 accuracy lost (negative when
    the compressed model scores higher). Divided by |fp32|: a task metric recorded negated
    (neg_mae, lower is better) gives the share by which the error grew."""
    if fp32_accuracy is None or accuracy is None or not fp32_accuracy:
        return None
    return (float(fp32_accuracy) - float(accuracy)) / abs(float(fp32_accuracy))


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of every Conv/Linear layer in one forward of ``example_input``
    (per sample: the count is divided by the batch size)."""
    import torch
    from torch import nn

    macs: dict[str, int] = {}
    batch = int(example_input.shape[0]) if example_input.dim() > 0 else 1

    def hook(name: str, module: nn.Module) -> Any:
        def count(_m: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            weight = module.weight
            per_output = weight[0].numel() if isinstance(module, nn.modules.conv._ConvNd) \
                else int(weight.shape[1])
            macs[name] = macs.get(name, 0) + output.numel() // max(batch, 1) * per_output
        return count

    handles = [
        module.register_forward_hook(hook(name, module))
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return macs


def bit_operations(macs: Mapping[str, int], plan: CompressionPlan) -> int:
    """BOPs of a plan's structure: each layer's MACs x weight bits x activation bits.

    A layer the plan leaves at 32 bits is float on both sides; a quantized layer runs its
    activations at ``plan.activation_bits`` (32 for weight-only quantization)."""
    total = 0
    for layer, count in macs.items():
        weight_bits = plan.bits_for(layer)
        activation_bits = FLOAT_BITS if weight_bits == FLOAT_BITS else plan.activation_bits
        total += int(count) * weight_bits * activation_bits
    return total


def versus_fp32(
    *,
    accuracy: float | None,
    size_bytes: float | None,
    flops: float | None,
    bops: float | None,
    latency_vs_fp32: float | None,
    fp32: Mapping[str, Any] | None,
) -> dict[str, float | None]:
    """A trial's figures against the fp32 baseline trial's (``fp32`` holds its
    ``accuracy``, ``size_bytes``, ``flops`` and ``bops``; None when the study has none).
    Speed comes from the interleaved ratio measured beside the fp32 file."""
    base = fp32 or {}
    fp32_acc = base.get("accuracy")
    fp32_size = base.get("size_bytes")
    return {
        "times_smaller": (float(fp32_size) / float(size_bytes)
                          if fp32_size and size_bytes else None),
        "times_faster": 1.0 / float(latency_vs_fp32) if latency_vs_fp32 else None,
        "accuracy_change_points": (100.0 * (float(accuracy) - float(fp32_acc))
                                   if accuracy is not None and fp32_acc is not None else None),
        "accuracy_drop_rate": accuracy_drop_rate(fp32_acc, accuracy),
        "flop_reduction_rate": reduction_rate(base.get("flops"), flops),
        "bops_reduction_rate": reduction_rate(base.get("bops"), bops),
    }


def record_versus_fp32(record: TrialRecord, fp32: TrialRecord | None) -> dict[str, float | None]:
    """``versus_fp32`` for two study records (the trial and the fp32 baseline trial)."""
    base = None if fp32 is None else {
        "accuracy": fp32.accuracy, "size_bytes": fp32.size_bytes, "flops": fp32.flops,
        "bops": fp32.bops,
    }
    return versus_fp32(
        accuracy=record.accuracy, size_bytes=record.size_bytes, flops=record.flops,
        bops=record.bops, latency_vs_fp32=record.latency_vs_fp32, fp32=base,
    )
