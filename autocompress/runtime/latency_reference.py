"""The study's fp32 latency reference, and the budget latency estimate built on it.

Absolute milliseconds drift on shared machines: fp32 ResNet-20 timed anywhere from 1.13 to
1.83 ms across the trials of one study on a 2-core machine. A latency budget judged on the
absolute median of each measurement lets a candidate pass the pre-check and fail the final
measurement (or the reverse) by drift alone. So a budget is judged on

    estimate = (candidate / fp32, timed interleaved in the same window) x fp32 reference

where the reference is the fp32 file's latency measured carefully once per study and machine
(many runs in several rounds, recorded with its spread). The ratio cancels the drift, the
reference turns it back into the user's unit; the pre-check and the final measurement use
this same estimator. The absolute medians stay recorded beside it.

Latency is a property of the structure, not of the weight values: a promoted retrain has its
parent's structure, and plans the sampler proposes twice share theirs. Each final
measurement of a structure already measured in this run (a careful pre-check counts: its
file has the same graph, untrained) is pooled with the earlier ones (``pooled_ratio``, the
median), so a retrain cannot flip its parent's budget verdict by one noisy look (ResNet-20
at 0.6x fp32: the same structure measured 0.575x, then 0.587x, with the budget at 0.585x).
The noise is not only per session: on a shared 2-core machine the same int8 file timed
0.50x of fp32 for seconds (fp32 at 1.0 ms), then 0.67x (fp32 at 1.33 ms) as the machine
slowed, so one look taken wholly in one state, pre-check or final, can miss by 30%. The
file's own ratio stays recorded beside the pooled one.
"""

from __future__ import annotations

import hashlib
import json
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autocompress.runtime import timing
from autocompress.runtime.cpu import cpu_model
from autocompress.runtime.measure import LatencyStats
from autocompress.runtime.sessions import DEFAULT_TARGET

REFERENCE_ATTR = "fp32_reference"  # study attribute: {machine key: ReferenceLatency dict}
REFERENCE_ROUNDS = 8  # separate sessions, so one unlucky window cannot set the reference
REFERENCE_REPEATS = 40  # timed runs per round


@dataclass(frozen=True)
class ReferenceLatency:
    """The fp32 file's latency on one machine, measured once per study and machine."""

    median_ms: float
    spread_ms: float  # IQR of all runs
    round_medians_ms: list[float]
    runs: int
    machine: dict[str, Any]
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceLatency:
        return cls(
            median_ms=float(data["median_ms"]),
            spread_ms=float(data["spread_ms"]),
            round_medians_ms=[float(v) for v in data.get("round_medians_ms", [])],
            runs=int(data.get("runs", 0)),
            machine=dict(data.get("machine", {})),
            measured_at=str(data.get("measured_at", "")),
        )

    def describe(self) -> str:
        low = min(self.round_medians_ms, default=self.median_ms)
        high = max(self.round_medians_ms, default=self.median_ms)
        return (f"fp32 reference {self.median_ms:.3g} ms (IQR {self.spread_ms:.2g} ms, "
                f"{self.runs} runs, round medians {low:.3g}-{high:.3g} ms)")


def machine(threads: int, batch_size: int) -> dict[str, Any]:
    """What a latency reference is only valid for: this host, its CPU, threads and batch."""
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "threads": int(threads),
        "batch_size": int(batch_size),
    }


def machine_key(info: dict[str, Any]) -> str:
    body = json.dumps(info, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def measure_reference(
    fp32_onnx: Path,
    input_shape: tuple[int, ...],
    *,
    threads: int,
    rounds: int = REFERENCE_ROUNDS,
    repeats: int = REFERENCE_REPEATS,
    target: str = DEFAULT_TARGET,
) -> ReferenceLatency:
    """Time the fp32 file in ``rounds`` fresh sessions of ``repeats`` runs each."""
    samples: list[float] = []
    medians: list[float] = []
    for _ in range(rounds):
        stats, runs = timing.time_latency_samples(
            fp32_onnx, input_shape, threads=threads, repeats=repeats, warmup=5, target=target
        )
        samples += runs
        medians.append(round(stats.median_ms, 5))
    overall = LatencyStats.from_samples(samples)
    return ReferenceLatency(
        median_ms=overall.median_ms,
        spread_ms=overall.spread_ms,
        round_medians_ms=medians,
        runs=len(samples),
        machine=machine(threads, input_shape[0]),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def stored_references(study_attrs: dict[str, Any]) -> dict[str, ReferenceLatency]:
    raw = study_attrs.get(REFERENCE_ATTR)
    data = json.loads(raw) if isinstance(raw, str) else (raw or {})
    return {key: ReferenceLatency.from_dict(value) for key, value in data.items()}


def encode_references(refs: dict[str, ReferenceLatency]) -> str:
    return json.dumps({key: ref.to_dict() for key, ref in refs.items()}, sort_keys=True)


def resume_note(ref: ReferenceLatency, others: list[ReferenceLatency], measured_now: bool) -> str:
    """One line for the user: where the reference came from."""
    if not measured_now:
        return f"{ref.describe()}, measured when the study began on this machine"
    if not others:
        return f"{ref.describe()}; latency budgets are judged as ratio to fp32 x this reference"
    first = others[0]
    return (f"{ref.describe()}, re-measured: this study's earlier reference "
            f"({first.median_ms:.3g} ms) came from another machine or setting "
            f"(host {first.machine.get('host')}, {first.machine.get('threads')} threads)")


def pooled_ratio(ratio: float, earlier: list[float]) -> float:
    """The median of this measurement's ratio and the earlier ones of the same structure."""
    return float(statistics.median([ratio, *earlier]))


def estimate_ms(ratio: float, reference: ReferenceLatency) -> float:
    """Budget latency of a candidate timed at ``ratio`` x fp32 in the same window."""
    return float(ratio) * reference.median_ms

