"""Size, parameter, FLOP and latency-statistics helpers: pure functions, no ONNX Runtime.

Units (team contract): bytes, milliseconds, fvcore FLOP counts (1 multiply-add = 1 flop).
Latency *timing* lives in runtime/timing.py (on ONNX Runtime sessions); this module only turns
samples into statistics so any timer can report the same way.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autocompress.model.plan import CompressionPlan

_FLOAT_BITS = 32


@dataclass(frozen=True)
class LatencyStats:
    """Robust summary of repeated latency samples, all in milliseconds.

    ``spread_ms`` is the inter-quartile range: the machines we run on are shared and noisy,
    and the IQR is not dragged around by the occasional descheduled run the way a std is.
    """

    median_ms: float
    spread_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray) -> LatencyStats:
        data = np.asarray(samples_ms, dtype=np.float64)
        if data.size == 0:
            raise ValueError("LatencyStats needs at least one sample; time at least one run")
        p10, q25, median, q75, p90 = np.percentile(data, [10, 25, 50, 75, 90])
        return cls(
            median_ms=float(median),
            spread_ms=float(q75 - q25),
            p10_ms=float(p10),
            p90_ms=float(p90),
            repeats=int(data.size),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (artifacts are checked against it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the file on disk: the size the user ships."""
    return Path(path).stat().st_size


def zipped_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a zip (deflate) archive holding the file.

    Unstructured sparsity leaves zeros *in* the dense tensors, so the raw file does not
    shrink; what a user gets from it is what a generic compressor gets, so we report that.
    """
    src = Path(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.write(src, arcname=src.name)
    return buffer.getbuffer().nbytes


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """fvcore FLOP count of one forward pass on ``example_input`` (1 multiply-add = 1 flop),
    attention included (``model.flops``)."""
    from autocompress.model import flops

    return flops.count_total(model, example_input)


# The weight matrices an LSTM/GRU/RNN (weight_ih_l0, weight_hh_l0_reverse) or a
# MultiheadAttention's input projection (in_proj_weight, or q/k/v_proj_weight) carry under
# the module's own name: one planned width for all of them (model/inventory.py).
_LAYER_WEIGHT_PREFIXES = ("weight_ih_", "weight_hh_", "in_proj_weight", "q_proj_weight",
                          "k_proj_weight", "v_proj_weight")


def packing_limit_bytes(model: nn.Module, plan: CompressionPlan) -> int:
    """Lower bound on the weight bytes: every parameter packed at its planned bit width.

    Quantized layers' weights count ``plan.bits_for(layer)`` bits per element; everything
    else (biases, BN, unplanned layers) counts 32. Comparing this with the real file size
    shows how much of the file is format overhead (scales, zero points, graph).
    """
    total_bits = 0
    for name, param in model.named_parameters():
        bits = _FLOAT_BITS
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" or leaf.startswith(_LAYER_WEIGHT_PREFIXES):
            bits = plan.bits_for(layer)
        total_bits += param.numel() * bits
    return math.ceil(total_bits / 8)
