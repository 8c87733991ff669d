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

from autocompress.study.records import finite_number

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


def times_smaller(fp32_size: float | None, size: float | None) -> float | None:
    """fp32 bytes / these bytes ("x smaller"); None when either is missing or zero."""
    return float(fp32_size) / float(size) if fp32_size and size else None


def times_faster(latency_vs_fp32: float | None) -> float | None:
    """1 / the latency ratio to fp32 ("x faster"); None without a ratio."""
    return 1.0 / float(latency_vs_fp32) if latency_vs_fp32 else None


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
    return {
        "times_smaller": times_smaller(base.get("size_bytes"), size_bytes),
        "times_faster": times_faster(latency_vs_fp32),
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


def row_versus_fp32(row: Mapping[str, Any], fp32: Mapping[str, Any] | None) -> dict[str, Any]:
    """``versus_fp32`` for plain rows (the dashboard's trials; ``fp32``: the fp32 baseline
    trial's row, with its ``number``), plus what the trial page shows beside it: the test
    accuracy change (points), how many times smaller the zipped file and how many times
    fewer the parameters.

    Speed prefers the interleaved ratio measured beside the fp32 file in the same run
    (``latency_vs_fp32``: latency drifts, interleaving cancels it), then the fp32 latency
    recorded on the trial, then the fp32 baseline trial's own latency.
    """
    ratio = finite_number(row.get("latency_vs_fp32"))
    out: dict[str, Any] = versus_fp32(
        accuracy=finite_number(row.get("accuracy")),
        size_bytes=finite_number(row.get("size_bytes")),
        flops=finite_number(row.get("flops")),
        bops=finite_number(row.get("bops")),
        latency_vs_fp32=ratio if ratio and ratio > 0 else None,
        fp32=fp32,
    )
    out["latency_basis"] = None
    out["fp32_trial"] = fp32["number"] if fp32 else None
    lat = row.get("latency_ms")
    fp32_lat = finite_number(row.get("fp32_latency_ms"))
    if out["times_faster"] is not None:
        out["latency_basis"] = "interleaved with the fp32 file in the same run"
    elif fp32_lat and lat:
        out["times_faster"] = fp32_lat / lat
        out["latency_basis"] = "fp32 latency recorded with this trial"
    elif fp32 and fp32.get("latency_ms") and lat:
        out["times_faster"] = fp32["latency_ms"] / lat
        out["latency_basis"] = f"fp32 baseline trial #{fp32['number']}"
    out.update(_beside_fp32(row, fp32 or {}))
    return out


def _beside_fp32(row: Mapping[str, Any], fp32: Mapping[str, Any]) -> dict[str, float | None]:
    test, fp32_test = row.get("test_accuracy"), fp32.get("test_accuracy")
    zipped, fp32_zipped = row.get("zip_size_bytes"), fp32.get("zip_size_bytes")
    params, fp32_params = row.get("params"), fp32.get("params")
    return {
        "test_accuracy_change_points": (100.0 * (test - fp32_test) if test is not None
                                        and fp32_test is not None else None),
        "zip_times_smaller": (fp32_zipped / zipped if zipped and fp32_zipped is not None
                              else None),
        "params_times_fewer": (fp32_params / params if params and params > 0
                               and fp32_params is not None else None),
    }
