"""ONNX Runtime: sessions, accuracy and latency of exported files, and the ORT quantizer calls.

The only module that imports ``onnxruntime`` (sessions and ``onnxruntime.quantization``), so
the rest of the package stays importable and testable without it, and every runtime knob we
set is visible in one place. Every figure the search records is measured here, on the file
the user will get (design rule 1), with explicit threads and session options (rule 3).
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from autocompress.config import TARGETS as config_targets
from autocompress.errors import InputError
from autocompress.measure import LatencyStats
from autocompress.task_metric import TOP1, Metric

log = logging.getLogger(__name__)

PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
# Where a study's files are timed and scored (``--target``): ONNX Runtime on the CPU, OpenVINO
# on the CPU (the same ONNX files), or the GPU runtimes through ONNX Runtime's CUDA and
# TensorRT execution providers (they need onnxruntime-gpu and an NVIDIA GPU).
TARGETS: tuple[str, ...] = config_targets
DEFAULT_TARGET = "onnxruntime-cpu"
_GPU_PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
DEFAULT_THREADS = 2
# Folds weight DequantizeLinear into float weights at load. Helps int4 (weights would be
# dequantized on every run otherwise), hurts int8 (loses the integer kernels): so it is a
# per-file choice made by measurement, see pick_session_options.
DISABLE_QDQ_OPTION: dict[str, str] = {"session.disable_quant_qdq": "1"}

_QUANT_TYPES = ("QInt8", "QUInt8", "QInt4", "QUInt4", "QInt16", "QUInt16")


@dataclass(frozen=True)
class InterleavedLatency:
    """Candidate and reference timed round by round in the same window (drift hits both)."""

    candidate: LatencyStats
    reference: LatencyStats
    ratio: float  # candidate median / reference median; < 1 means the candidate is faster
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "reference": self.reference.to_dict(),
            "ratio": self.ratio,
            "rounds": self.rounds,
        }


# -- sessions -------------------------------------------------------------------------------


def check_target(target: str) -> None:
    """Raise a one-line InputError when ``target`` is unknown or cannot run here."""
    if target not in TARGETS:
        raise InputError(f"target {target!r} is unknown; use one of {list(TARGETS)}")
    if target == "openvino-cpu":
        from autocompress import openvino_runtime

        if not openvino_runtime.available():
            raise InputError("the openvino-cpu target needs OpenVINO: "
                             f"{openvino_runtime.INSTALL_HINT}")
    providers = _GPU_PROVIDERS.get(target)
    if providers and providers[0] not in ort.get_available_providers():
        raise InputError(
            f"the {target} target needs an NVIDIA GPU and ONNX Runtime's {providers[0]} "
            f"(this machine's ONNX Runtime offers {ort.get_available_providers()}); run it "
            "where `pip install onnxruntime-gpu` sees a GPU, or use --target onnxruntime-cpu"
        )


def make_session(
    path: str | os.PathLike[str],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> Any:
    """A session for ``target`` with explicit threads (ONNX Runtime: sequential execution
    and full graph optimization; OpenVINO: one stream, latency hint).

    ``session_options`` are session config entries (e.g. ``{"session.disable_quant_qdq": "1"}``);
    for OpenVINO, compile properties.
    """
    if threads < 1:
        raise InputError(f"threads={threads} must be >= 1; use e.g. --threads 2")
    model_path = Path(path)
    if not model_path.is_file():
        raise InputError(f"ONNX file {str(model_path)!r} does not exist; export the model first")
    if target != DEFAULT_TARGET:
        check_target(target)
    if target == "openvino-cpu":
        from autocompress.openvino_runtime import OpenVINOSession

        return OpenVINOSession(model_path, threads=threads, options=session_options)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One op at a time with a fixed thread pool: the steadiest numbers on a shared machine.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; ORT warns about e.g. unused initializers
    for key, value in (session_options or {}).items():
        options.add_session_config_entry(str(key), str(value))
    providers = _GPU_PROVIDERS.get(target, PROVIDERS)
    return ort.InferenceSession(str(model_path), options, providers=list(providers))


def _input_name(session: Any) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise InputError(f"ONNX model has inputs {names}; autocompress handles one image input")
    return inputs[0].name


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _split_batch(batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Accept ``x`` or ``(x, y)`` batches (tensors or arrays)."""
    if isinstance(batch, (tuple, list)):
        x = _as_numpy(batch[0])
        y = None if len(batch) < 2 else np.asarray(_labels(batch[1]))
        return x, y
    return _as_numpy(batch), None


def _labels(y: Any) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y)


def predictions(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> np.ndarray:
    """Top-1 class of every sample (argmax of the first output), batches in order."""
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    name = _input_name(session)
    out: list[np.ndarray] = []
    for batch in batches:
        x, _ = _split_batch(batch)
        logits = session.run(None, {name: x})[0]
        out.append(np.asarray(logits).argmax(axis=1))
    if not out:
        return np.zeros((0,), dtype=np.int64)
    return np.concatenate(out).astype(np.int64)


def onnx_accuracy(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
    metric: Metric | None = None,
) -> float:
    """The task's figure for the ONNX file on ``(x, y)`` batches: top-1 accuracy in [0, 1]
    unless ``metric`` says otherwise (then its higher-is-better score)."""
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    name = _input_name(session)

    def scored() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for batch in batches:
            x, y = _split_batch(batch)
            if y is None:
                raise InputError("onnx_accuracy needs (x, y) batches; got inputs without labels")
            yield np.asarray(session.run(None, {name: x})[0]), y

    return (metric or TOP1).score_batches(scored())


# -- latency --------------------------------------------------------------------------------


def _random_input(session: Any, input_shape: Sequence[int]) -> dict[str, Any]:
    # Fixed seed: latency does not depend on values, but reproducible inputs rule that out.
    rng = np.random.default_rng(0)
    x = rng.standard_normal(tuple(int(d) for d in input_shape)).astype(np.float32)
    return {_input_name(session): x}


def _time_runs(session: Any, feed: dict[str, Any], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise InputError(f"repeats={repeats} must be >= 1 (try 30)")
    if warmup < 0:
        raise InputError(f"warmup={warmup} must be >= 0 (try 5)")


def time_latency(
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    repeats: int = 50,
    warmup: int = 10,
    target: str = DEFAULT_TARGET,
) -> LatencyStats:
    """Per-run wall time of ``session.run`` on a random input of ``input_shape`` (with batch)."""
    stats, _ = time_latency_samples(
        path, input_shape, threads=threads, session_options=session_options, repeats=repeats,
        warmup=warmup, target=target,
    )
    return stats


def time_latency_samples(
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    repeats: int = 50,
    warmup: int = 10,
    target: str = DEFAULT_TARGET,
) -> tuple[LatencyStats, list[float]]:
    """``time_latency`` with the raw per-run samples (ms), for callers that pool rounds."""
    _check_counts(repeats, warmup)
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    feed = _random_input(session, input_shape)
    _time_runs(session, feed, warmup)
    samples = _time_runs(session, feed, repeats)
    return LatencyStats.from_samples(samples), samples


def time_interleaved(
    candidate: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    threads: int = DEFAULT_THREADS,
    candidate_options: Mapping[str, str] | None = None,
    reference_options: Mapping[str, str] | None = None,
    rounds: int = 5,
    repeats: int = 20,
    warmup: int = 5,
    target: str = DEFAULT_TARGET,
) -> InterleavedLatency:
    """Time two files alternately, ``repeats`` runs each per round, for ``rounds`` rounds.

    Latency on shared machines drifts by tens of percent within minutes (design rule 7);
    alternating in the same window makes the drift hit both sides, so the ratio is
    trustworthy even when the absolute numbers move. The order flips every round so neither
    side always runs on a cache warmed by the other.
    """
    _check_counts(repeats, warmup)
    if rounds < 1:
        raise InputError(f"rounds={rounds} must be >= 1 (try 5)")
    cand = make_session(candidate, threads=threads, session_options=candidate_options,
                        target=target)
    ref = make_session(reference, threads=threads, session_options=reference_options,
                       target=target)
    cand_feed = _random_input(cand, input_shape)
    ref_feed = _random_input(ref, input_shape)
    _time_runs(cand, cand_feed, warmup)
    _time_runs(ref, ref_feed, warmup)
    cand_samples: list[float] = []
    ref_samples: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            cand_samples += _time_runs(cand, cand_feed, repeats)
            ref_samples += _time_runs(ref, ref_feed, repeats)
        else:
            ref_samples += _time_runs(ref, ref_feed, repeats)
            cand_samples += _time_runs(cand, cand_feed, repeats)
    cand_stats = LatencyStats.from_samples(cand_samples)
    ref_stats = LatencyStats.from_samples(ref_samples)
    return InterleavedLatency(
        candidate=cand_stats,
        reference=ref_stats,
        ratio=cand_stats.median_ms / ref_stats.median_ms,
        rounds=rounds,
    )


def has_qdq(path: str | os.PathLike[str]) -> bool:
    """Whether the file holds any DequantizeLinear node (else QDQ session options are moot)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == "DequantizeLinear" for node in model.graph.node)


def pick_session_options(
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    threads: int = DEFAULT_THREADS,
    rounds: int = 4,
    repeats: int = 15,
    target: str = DEFAULT_TARGET,
) -> tuple[dict[str, str], LatencyStats]:
    """Try the default options and ``session.disable_quant_qdq=1``; keep the faster.

    Both variants are timed interleaved (same window). Files without QDQ nodes are timed
    once with the defaults: the option cannot change them. The returned options must be
    recorded with the artifact; the latency is only reproducible with them.
    """
    default: dict[str, str] = {}
    if target != DEFAULT_TARGET or not has_qdq(path):  # the option is ONNX Runtime CPU's
        stats = time_latency(path, input_shape, threads=threads, repeats=rounds * repeats,
                             warmup=5, target=target)
        return default, stats
    result = time_interleaved(
        path,
        path,
        input_shape,
        threads=threads,
        candidate_options=DISABLE_QDQ_OPTION,
        reference_options=default,
        rounds=rounds,
        repeats=repeats,
    )
    if result.candidate.median_ms < result.reference.median_ms:
        return dict(DISABLE_QDQ_OPTION), result.candidate
    return default, result.reference


def cpu_model() -> str:
    """The CPU's marketing name (recorded with every latency)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_has_vnni() -> bool | None:
    """VNNI (int8 dot product) present; None when the flags cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return None


def runtime_info(
    threads: int,
    batch_size: int,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> dict[str, Any]:
    """What a user needs to reproduce a latency figure (JSON-serialisable)."""
    if target == "openvino-cpu":
        from autocompress import openvino_runtime

        engine = {"runtime": "openvino", "version": openvino_runtime.version(),
                  "providers": ["CPU"]}
    else:
        engine = {"runtime": "onnxruntime", "version": ort.__version__,
                  "providers": list(_GPU_PROVIDERS.get(target, PROVIDERS))}
    return {
        "target": target,
        **engine,
        "session_options": dict(session_options or {}),
        "threads": int(threads),
        "inter_op_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization": "all",
        "batch_size": int(batch_size),
        "cpu": cpu_model(),
        "cpu_vnni": _cpu_has_vnni(),  # False on x86 -> int8 weights are range-reduced (63)
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


# -- quantizer calls (used by quantize.py, which never imports onnxruntime) ----------------


class _BatchReader:
    """CalibrationDataReader over an iterable of input batches (tensors/arrays or (x, y))."""

    def __init__(self, input_name: str, batches: Iterable[Any]) -> None:
        self._name = input_name
        self._iter: Iterator[Any] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is None:
            return None
        self.count += 1
        x, _ = _split_batch(batch)
        return {self._name: x}

    def __iter__(self) -> _BatchReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    if name not in _QUANT_TYPES:
        raise ValueError(f"quant type {name!r} is not one of {list(_QUANT_TYPES)}")
    return getattr(QuantType, name)


def pre_process(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ORT's recommended step before static quantization (shape inference + optimization).

    Measured here: resnet50 int8 went from 2x slower than fp32 to 3x faster with it. Symbolic
    shape inference fails on some graphs; we then retry without it, and finally copy the file
    unchanged (quantization still works, it may just miss a few tensors).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst_path = Path(dst)
    attempts: tuple[dict[str, bool], ...] = ({}, {"skip_symbolic_shape": True})
    for kwargs in attempts:
        try:
            quant_pre_process(str(src), str(dst_path), **kwargs)
            return dst_path
        except Exception as exc:  # ORT raises bare Exceptions from shape inference
            log.warning("quant_pre_process %s failed (%s); retrying", kwargs or "", exc)
    log.warning("quant_pre_process failed; quantizing %s without pre-processing", src)
    dst_path.write_bytes(Path(src).read_bytes())
    return dst_path


def quantize_qdq(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Iterable[Any],
    *,
    activation_type: str = "QUInt8",
    weight_overrides: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    activation_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    nodes_to_quantize: Sequence[str] | None = None,
    op_types: Sequence[str] | None = None,
    calibration_method: str = "minmax",
) -> Path:
    """``quantize_static`` in QDQ format with per-channel weights and calibrated activations.

    ``calibration_method``: how activation ranges are read from the calibration batches:
    ``minmax`` (the observed range), ``entropy`` (the range minimising the KL divergence of
    the quantized histogram, TensorRT's method) or ``percentile`` (99.999th percentile of
    |x|: outliers clipped).

    ``weight_overrides``: initializer name -> one dict per output channel with plain values
    ``{"quant_type": "QInt4"|"QInt8", "axis": int, "scale": float, "zero_point": int}``.
    ``activation_overrides``: tensor name -> ``{"scale": float, "zero_point": int}`` (e.g.
    ranges learned during QAT). Quant types are passed as strings so callers need no ORT.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration_method not in methods:
        raise InputError(f"calibration method {calibration_method!r} is unknown; use one of "
                         f"{sorted(methods)}")
    act_type = _quant_type(activation_type)
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, channels in (weight_overrides or {}).items():
        overrides[name] = [_convert_override(ch, "QInt8") for ch in channels]
    for name, params in (activation_overrides or {}).items():
        overrides[name] = [_convert_override(params, activation_type)]
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise InputError("calibration gave no batches; pass at least one input batch")
    reader = _BatchReader(_graph_input_name(src), itertools.chain([first], batches))
    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        calibrate_method=methods[calibration_method],
        op_types_to_quantize=list(op_types) if op_types else None,
        per_channel=True,
        activation_type=act_type,
        weight_type=_quant_type("QInt8"),
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        extra_options={"TensorQuantOverrides": overrides},
    )
    return Path(dst)


def _graph_input_name(path: str | os.PathLike[str]) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    if len(names) != 1:
        raise InputError(f"ONNX model has inputs {names}; autocompress handles one image input")
    return names[0]


_ZERO_POINT_DTYPE: dict[str, Any] = {
    "QInt8": np.int8,
    "QUInt8": np.uint8,
    "QInt4": np.int8,  # ORT packs 4-bit values itself; it takes them in 8-bit containers
    "QUInt4": np.uint8,
    "QInt16": np.int16,
    "QUInt16": np.uint16,
}


def _convert_override(entry: Mapping[str, Any], default_type: str) -> dict[str, Any]:
    """Plain values -> the numpy scalars ORT's override code expects (it calls .squeeze())."""
    type_name = str(entry.get("quant_type", default_type))
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "quant_type":
            out[key] = _quant_type(str(value))
        elif key == "scale":
            out[key] = np.asarray(value, dtype=np.float32)
        elif key == "zero_point":
            out[key] = np.asarray(value, dtype=_ZERO_POINT_DTYPE[type_name])
        elif key == "axis":
            out[key] = int(value)
        else:
            out[key] = value
    return out


def quantize_dynamic(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, weight_type: str = "QInt8"
) -> Path:
    """ORT dynamic quantization: int8 weights, activations quantized on the fly at run time."""
    from onnxruntime.quantization import quantize_dynamic as _quantize_dynamic

    _quantize_dynamic(str(src), str(dst), weight_type=_quant_type(weight_type))
    return Path(dst)
