"""The target's own profiler on an exported file: whole-run times and every node's kernel
time per run (ONNX Runtime's trace, or OpenVINO's performance counters); ``onnx_profile``
turns them into the ``profile --onnx`` table."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from autocompress.runtime.sessions import (
    DEFAULT_TARGET,
    DEFAULT_THREADS,
    check_target,
    make_session,
)
from autocompress.runtime.timing import check_counts, random_input


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
    check_counts(runs, warmup)
    if target == "openvino-cpu":
        return _openvino_node_times(path, input_shape, runs, warmup, threads)
    with tempfile.TemporaryDirectory(prefix="autocompress-ort-profile-") as tmp:
        session = make_session(path, threads=threads, session_options=session_options,
                               target=target, profile_prefix=str(Path(tmp) / "ort"))
        feed = random_input(session, input_shape)
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
    feed = random_input(session, input_shape)
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
