"""Where an ONNX file's time goes in ONNX Runtime: what deploys, profiled by the runtime.

``autocompress profile --onnx model.onnx`` (an exported candidate, a trial's file): ONNX
Runtime's own profiler records every node's kernel time; the table gives each node's median
over the runs, its share of the median whole run, and the rest of the run (session overhead,
memory copies between kernels) as its own row, so shares add up to 100% of what the
runtime spent, not of what the kernels spent. Torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

OVERHEAD = "(session overhead)"
PROFILERS = {"onnxruntime-cpu": "ONNX Runtime profiler",
             "openvino-cpu": "OpenVINO performance counters (compiled graph's nodes)",
             "onnxruntime-cuda": "ONNX Runtime profiler (CUDA execution provider)",
             "tensorrt": "ONNX Runtime profiler (TensorRT's engine as one fused node)"}


@dataclass
class NodeProfile:
    name: str
    op_type: str
    latency_ms: float  # median kernel time over the runs
    latency_share: float  # percent of the median whole run


@dataclass
class OnnxProfile:
    path: str
    input_shape: list[int]
    run_ms: float  # median whole run (session.run as the runtime times it)
    runs: int
    threads: int
    rows: list[NodeProfile]
    by_op: dict[str, float] = field(default_factory=dict)  # op type -> summed median ms
    target: str = "onnxruntime-cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "op_type", "latency_ms", "latency_share"])
        for row in self.rows:
            writer.writerow([row.name, row.op_type, f"{row.latency_ms:.6f}",
                             f"{row.latency_share:.4f}"])
        return out.getvalue()


def profile_onnx(
    path: str | os.PathLike[str],
    input_shape: list[int] | None = None,
    *,
    repeats: int = 20,
    threads: int = 1,
    target: str = "onnxruntime-cpu",
) -> OnnxProfile:
    """Profile ``path`` at batch 1 (``input_shape`` C,H,W; default: the file's own) on
    ``target``'s own profiler (ONNX Runtime's trace, OpenVINO's performance counters)."""
    from autocompress.errors import InputError
    from autocompress.runtime.node_times import profile_nodes
    from autocompress.runtime.sessions import input_shape_of

    shape = list(input_shape) if input_shape is not None else input_shape_of(path)
    if shape is None:
        raise InputError(f"{path} has a symbolic input shape; pass --input-shape C,H,W")
    runs, nodes = profile_nodes(path, [1, *shape], runs=repeats, threads=threads,
                                target=target)
    run_ms = statistics.median(runs)
    rows = [NodeProfile(name, op, statistics.median(times), 0.0)
            for name, (op, times) in nodes.items()]
    kernels = sum(r.latency_ms for r in rows)
    rows.append(NodeProfile(OVERHEAD, "", max(run_ms - kernels, 0.0), 0.0))
    whole = max(run_ms, kernels)
    for row in rows:
        row.latency_share = 100.0 * row.latency_ms / whole if whole > 0 else 0.0
    by_op: dict[str, float] = {}
    for row in rows[:-1]:
        by_op[row.op_type] = by_op.get(row.op_type, 0.0) + row.latency_ms
    return OnnxProfile(str(path), shape, run_ms, repeats, threads, rows,
                       dict(sorted(by_op.items(), key=lambda kv: -kv[1])), target)


def format_table(report: OnnxProfile) -> str:
    width = max((len(r.name) for r in report.rows), default=10)
    lines = [f"{'node':<{width}}  {'op':<24} {'ms':>9} {'latency %':>9}"]
    for row in report.rows:
        lines.append(f"{row.name:<{width}}  {row.op_type:<24} {row.latency_ms:>9.4f} "
                     f"{row.latency_share:>9.1f}")
    total = sum(r.latency_share for r in report.rows)
    lines.append(f"{'TOTAL':<{width}}  {'':<24} {report.run_ms:>9.4f} {total:>9.1f}")
    ops = ", ".join(f"{op} {ms:.3f} ms" for op, ms in list(report.by_op.items())[:6])
    lines += ["", f"by op type: {ops}",
              f"{PROFILERS.get(report.target, report.target)}, {report.path}, input 1x"
              + "x".join(map(str, report.input_shape))
              + f", median of {report.runs} runs, {report.threads} thread(s); shares are of the "
              f"whole run, the rest is {OVERHEAD}"]
    return "\n".join(lines) + "\n"
