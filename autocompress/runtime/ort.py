"""ONNX Runtime: sessions, accuracy and latency of exported files, and the ORT quantizer calls.

The only module that imports ``onnxruntime`` (sessions and ``onnxruntime.quantization``), so
the rest of the package stays importable and testable without it, and every runtime knob we
set is visible in one place. Every figure the search records is measured here, on the file
the user will get (design rule 1), with explicit threads and session options (rule 3).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from autocompress.config.options import TARGETS as config_targets
from autocompress.errors import InputError
from autocompress.intake.metric import TOP1, Metric
from autocompress.runtime import tensorrt as tensorrt_engine
from autocompress.runtime.measure import LatencyStats

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
# time_interleaved opens a fresh session pair every round when a pair loads faster than this
# (small models, where placement noise matters most); larger models reuse their first pair.
FRESH_SESSION_LOAD_S = 0.25
# Each side of a time_interleaved round runs for at least this long: a 0.1 ms model timed
# over 6 runs (0.6 ms) let one scheduler blip decide a round, and a study recorded 2.8x for a
# file that re-measured at 1.2x. Fast models get more runs; ResNet-20 (1 ms) keeps its ~10.
MIN_ROUND_TIMING_S = 0.01
MAX_RUNS_PER_ROUND = 2000


@dataclass(frozen=True)
class InterleavedLatency:
    """Candidate and reference timed round by round in the same window (drift hits both)."""

    candidate: LatencyStats
    reference: LatencyStats
    ratio: float  # median over rounds of candidate / reference median; < 1: candidate faster
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
        from autocompress.runtime import openvino as openvino_runtime

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
    profile_prefix: str | None = None,
) -> Any:
    """A session for ``target`` with explicit threads (ONNX Runtime: sequential execution
    and full graph optimization; OpenVINO: one stream, latency hint).

    ``session_options`` are session config entries (e.g. ``{"session.disable_quant_qdq": "1"}``);
    for OpenVINO, compile properties. ``profile_prefix``: ONNX Runtime writes its profiler's
    trace there (``session.end_profiling()`` returns the file).
    """
    if threads < 1:
        raise InputError(f"threads={threads} must be >= 1; use e.g. --threads 2")
    model_path = Path(path)
    if not model_path.is_file():
        raise InputError(f"ONNX file {str(model_path)!r} does not exist; export the model first")
    if target != DEFAULT_TARGET:
        check_target(target)
    if target == "openvino-cpu":
        from autocompress.runtime.openvino import OpenVINOSession

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
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if target == "tensorrt":  # the builder flags every session of the target shares
        return ort.InferenceSession(str(model_path), options,
                                    providers=tensorrt_engine.providers(has_qdq(model_path)))
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
    x = np.asarray(x)
    # token ids stay integers (int64, as exported); everything else is float32
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8:
        return np.ascontiguousarray(x, dtype=np.int64)
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
    """Top-1 class of every sample (argmax of the first output over dimension 1; per
    position for per-pixel logits), batches in order."""
    out = raw_outputs(path, batches, threads=threads, session_options=session_options,
                      target=target)
    if out.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    return out.argmax(axis=1).astype(np.int64)


def raw_outputs(
    path: str | os.PathLike[str],
    batches: Iterable[Any],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> np.ndarray:
    """The first output of the file for every sample, batches in order (N, ...)."""
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    name = _input_name(session)
    out = [np.asarray(session.run(None, {name: _split_batch(batch)[0]})[0]) for batch in batches]
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)


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


def input_shape_of(path: str | os.PathLike[str]) -> list[int] | None:
    """The file's input shape without the batch dimension; None when a dimension is symbolic."""
    dims = make_session(path).get_inputs()[0].shape[1:]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def profile_nodes(
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    runs: int = 20,
    warmup: int = 2,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> tuple[list[float], dict[str, tuple[str, list[float]]]]:
    """The runtime's own profiler on ``path`` at ``input_shape`` (batch included): the
    whole-run times (ms, one per run after ``warmup``) and, per node in graph order, its op
    type and kernel time in each of those runs. ONNX Runtime's trace (on the GPU targets
    too: TensorRT's engine is one fused node there), or OpenVINO's performance counters for
    ``openvino-cpu`` (its nodes are the compiled graph's)."""
    import json
    import tempfile

    _check_counts(runs, warmup)
    if target == "openvino-cpu":
        return _openvino_node_times(path, input_shape, runs, warmup, threads)
    with tempfile.TemporaryDirectory(prefix="autocompress-ort-profile-") as tmp:
        session = make_session(path, threads=threads, session_options=session_options,
                               target=target, profile_prefix=str(Path(tmp) / "ort"))
        feed = _random_input(session, input_shape)
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    run_events = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kept = run_events[warmup:]
    windows = [(int(e["ts"]), int(e["ts"]) + int(e["dur"])) for e in kept]
    nodes: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        start = int(event["ts"])
        index = next((i for i, (a, b) in enumerate(windows) if a <= start <= b), None)
        if index is None:  # a warm-up run
            continue
        name = str(event["name"])[: -len("_kernel_time")]
        times = nodes.setdefault(name, (str(event.get("args", {}).get("op_name", "?")),
                                         [0.0] * len(kept)))[1]
        times[index] += int(event["dur"]) / 1e3
    return [int(e["dur"]) / 1e3 for e in kept], nodes


def _openvino_node_times(
    path: str | os.PathLike[str], input_shape: Sequence[int], runs: int, warmup: int,
    threads: int,
) -> tuple[list[float], dict[str, tuple[str, list[float]]]]:
    check_target("openvino-cpu")
    session = make_session(path, threads=threads, target="openvino-cpu",
                           session_options={"PERF_COUNT": "YES"})
    feed = _random_input(session, input_shape)
    whole: list[float] = []
    nodes: dict[str, tuple[str, list[float]]] = {}
    for index in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        elapsed = (time.perf_counter() - start) * 1e3
        if index < warmup:
            continue
        whole.append(elapsed)
        for name, op, ms in session.node_times():
            nodes.setdefault(name, (op, [0.0] * runs))[1][index - warmup] += ms
    return whole, nodes


# -- latency --------------------------------------------------------------------------------


# Random token ids for timing text models: 0 and 1, ids every vocabulary has (the cost of a
# transformer does not depend on which ids it reads).
TOKEN_ID_RANGE = 2


def _random_input(session: Any, input_shape: Sequence[int]) -> dict[str, Any]:
    # Fixed seed: latency does not depend on values, but reproducible inputs rule that out.
    rng = np.random.default_rng(0)
    shape = tuple(int(d) for d in input_shape)
    name = _input_name(session)
    if "int" in str(session.get_inputs()[0].type):  # token ids: any ids from a small range
        return {name: rng.integers(1, TOKEN_ID_RANGE, size=shape, dtype=np.int64)}
    return {name: rng.standard_normal(shape).astype(np.float32)}


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


def runs_per_round(repeats: int, fastest_ms: float) -> int:
    """``repeats``, or more when that many runs of a ``fastest_ms`` model last under
    MIN_ROUND_TIMING_S (the faster side sets the count, so both sides reach the floor)."""
    if fastest_ms <= 0:
        return MAX_RUNS_PER_ROUND
    needed = math.ceil(MIN_ROUND_TIMING_S * 1000.0 / fastest_ms)
    return max(repeats, min(needed, MAX_RUNS_PER_ROUND))


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

    A session's speed also depends on where its buffers landed when it was created: on a
    2-core AVX2 machine the same ResNet-20 file ran at 1.00 ms in one session and 1.28 ms in
    the next. So each round opens a fresh pair of sessions when loading is cheap (under
    FRESH_SESSION_LOAD_S a pair), and the ratio is the median of the rounds' ratios: one
    unlucky placement moves one round, not the verdict (the same structure's ratio spread
    0.65-0.82 over single pairs, 0.65-0.68 as a median over six).
    """
    _check_counts(repeats, warmup)
    if rounds < 1:
        raise InputError(f"rounds={rounds} must be >= 1 (try 5)")

    def open_pair() -> tuple[Any, dict[str, Any], Any, dict[str, Any], float, float]:
        start = time.perf_counter()
        cand = make_session(candidate, threads=threads, session_options=candidate_options,
                            target=target)
        ref = make_session(reference, threads=threads, session_options=reference_options,
                           target=target)
        loaded = time.perf_counter() - start
        cand_feed = _random_input(cand, input_shape)
        ref_feed = _random_input(ref, input_shape)
        warm = _time_runs(cand, cand_feed, max(warmup, 1)) + _time_runs(ref, ref_feed,
                                                                       max(warmup, 1))
        return cand, cand_feed, ref, ref_feed, loaded, min(warm)

    cand, cand_feed, ref, ref_feed, loaded, fastest_ms = open_pair()
    fresh = loaded < FRESH_SESSION_LOAD_S
    repeats = runs_per_round(repeats, fastest_ms)
    cand_samples: list[float] = []
    ref_samples: list[float] = []
    round_ratios: list[float] = []
    for r in range(rounds):
        if r and fresh:
            cand, cand_feed, ref, ref_feed, _, _ = open_pair()
        if r % 2 == 0:
            mine = _time_runs(cand, cand_feed, repeats)
            theirs = _time_runs(ref, ref_feed, repeats)
        else:
            theirs = _time_runs(ref, ref_feed, repeats)
            mine = _time_runs(cand, cand_feed, repeats)
        cand_samples += mine
        ref_samples += theirs
        round_ratios.append(float(np.median(mine)) / float(np.median(theirs)))
    cand_stats = LatencyStats.from_samples(cand_samples)
    ref_stats = LatencyStats.from_samples(ref_samples)
    return InterleavedLatency(
        candidate=cand_stats,
        reference=ref_stats,
        ratio=float(np.median(round_ratios)),
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
        from autocompress.runtime import openvino as openvino_runtime

        engine = {"runtime": "openvino", "version": openvino_runtime.version(),
                  "providers": ["CPU"]}
    else:
        engine = {"runtime": "onnxruntime", "version": ort.__version__,
                  "providers": list(_GPU_PROVIDERS.get(target, PROVIDERS))}
        if target == "tensorrt":
            engine["builder_flags"] = dict(tensorrt_engine.FLAGS_RULE)
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
