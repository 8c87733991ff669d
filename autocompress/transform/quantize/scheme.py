"""The quantization scheme: bit widths, integer ranges and symmetric per-channel scales."""

from __future__ import annotations

import functools
import logging
import os
import platform

import numpy as np
import torch

from autocompress.errors import ConfigError, PlanError

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A warning about the model, not the trial: said once per process, not every trial."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


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


# How activations are quantized (``plan.activation_scheme``): asymmetric = uint8/uint16 with a
# zero point (ORT's default QDQ, the fast x86 u8s8 path); symmetric = int8/int16 with zero
# point 0 (what many NPU/TensorRT-style targets want; 2.5-3x slower in ORT on x86 here).
ACTIVATION_SCHEMES: tuple[str, ...] = ("asymmetric", "symmetric")


WEIGHT_ONLY = 32  # plan.activation_bits meaning "quantize weights, keep activations float"


_EMA_MOMENTUM = 0.05  # fine-tunes here are a few hundred steps: a short memory is enough


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


def activation_range(bits: int, scheme: str) -> tuple[int, int]:
    """Integer range [qmin, qmax] of activations at ``bits`` in ``scheme`` (what the file's
    QuantizeLinear saturates to: uint8 [0, 255], int8 [-128, 127], ...)."""
    if bits not in ACTIVATION_QMAX:
        raise PlanError(f"activation bits {bits} cannot be quantized; use 8 or 16 (or 32)")
    if scheme == "symmetric":
        half = (ACTIVATION_QMAX[bits] + 1) // 2
        return -half, half - 1
    if scheme != "asymmetric":
        raise PlanError(f"activation scheme {scheme!r} is unknown; use one of "
                        f"{list(ACTIVATION_SCHEMES)}")
    return 0, ACTIVATION_QMAX[bits]


def activation_qparams(lo: float, hi: float, bits: int, scheme: str) -> tuple[float, int]:
    """(scale, zero_point) of an activation range: affine uint with a zero point, or
    symmetric int with zero point 0 and ``scale = max|x| / qmax`` (qmax 127 for 8 bits, as
    ORT's ``ActivationSymmetric`` computes it)."""
    if scheme != "symmetric":
        activation_range(bits, scheme)  # validates the scheme
        return _affine_qparams(lo, hi, ACTIVATION_QMAX[bits])
    qmax = activation_range(bits, scheme)[1]
    amax = max(abs(lo), abs(hi))
    scale = float(np.float32(amax / qmax))
    return (scale, 0) if scale > 0 else (1.0, 0)


def recurrent_weight_qmax(bits: int, *, dynamic: bool) -> int:
    """Weight range of an LSTM/GRU/RNN layer: an LSTM on ONNX Runtime's integer kernel
    (``DynamicQuantizeLSTM``, a u8s8 GEMM) like any int8 layer with integer kernels (see
    int8_weight_qmax); weight-only layers (GRU, RNN, int4, or float activations) the full
    range like other weight-only ones."""
    if dynamic and bits == 8:
        return int8_weight_qmax()
    return weight_only_qmax(bits)
