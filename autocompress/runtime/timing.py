"""How fast an exported file runs on a target: per-run wall times on a random input, two
files timed interleaved in the same window (the ratio the search trusts), and the per-file
choice of session options made by that timing.

Latency on shared machines drifts (design rule 7), so every comparison the search records is
interleaved; statistics are turned from samples by ``runtime.measure``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autocompress.errors import InputError
from autocompress.runtime.measure import LatencyStats
from autocompress.runtime.sessions import (
    DEFAULT_TARGET,
    DEFAULT_THREADS,
    DISABLE_QDQ_OPTION,
    has_qdq,
    input_name,
    make_session,
)

# time_interleaved opens a fresh session pair every round when a pair loads faster than this
# (small models, where placement noise matters most); larger models reuse their first pair.
FRESH_SESSION_LOAD_S = 0.25
# Each side of a time_interleaved round runs for at least this long: a 0.1 ms model timed
# over 6 runs (0.6 ms) let one scheduler blip decide a round, and a study recorded 2.8x for a
# file that re-measured at 1.2x. Fast models get more runs; ResNet-20 (1 ms) keeps its ~10.
MIN_ROUND_TIMING_S = 0.01
MAX_RUNS_PER_ROUND = 2000
# Random token ids for timing text models: 0 and 1, ids every vocabulary has (the cost of a
# transformer does not depend on which ids it reads).
TOKEN_ID_RANGE = 2


@dataclass(frozen=True)
class InterleavedLatency:
    """Candidate and reference timed round by round in the same window (drift hits both)."""

    candidate: LatencyStats
    reference: LatencyStats
    ratio: float  # median over rounds of candidate / reference median; < 1: candidate faster
    rounds: int
    # IQR of the rounds' ratios (0.0 for a single round): how far session placement and drift
    # moved the ratio between rounds; export's latency check widens its band by it.
    ratio_spread: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "reference": self.reference.to_dict(),
            "ratio": self.ratio,
            "rounds": self.rounds,
        }


def random_input(session: Any, input_shape: Sequence[int]) -> dict[str, Any]:
    """A feed for ``session`` at ``input_shape`` (batch included): standard-normal floats,
    or token ids for an integer input."""
    # Fixed seed: latency does not depend on values, but reproducible inputs rule that out.
    rng = np.random.default_rng(0)
    shape = tuple(int(d) for d in input_shape)
    name = input_name(session)
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


def check_counts(repeats: int, warmup: int) -> None:
    """Raise a one-line InputError for a run count below 1 or a negative warm-up."""
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
    check_counts(repeats, warmup)
    session = make_session(path, threads=threads, session_options=session_options,
                           target=target)
    feed = random_input(session, input_shape)
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


@dataclass(frozen=True)
class _Pair:
    """What time_interleaved opens: candidate and reference sessions, their feeds, how long
    the two took to load (s) and the fastest warm-up run of either (ms)."""

    cand: Any
    cand_feed: dict[str, Any]
    ref: Any
    ref_feed: dict[str, Any]
    loaded_s: float
    fastest_ms: float


def _open_pair(
    candidate: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    input_shape: Sequence[int],
    threads: int,
    candidate_options: Mapping[str, str] | None,
    reference_options: Mapping[str, str] | None,
    warmup: int,
    target: str,
) -> _Pair:
    start = time.perf_counter()
    cand = make_session(candidate, threads=threads, session_options=candidate_options,
                        target=target)
    ref = make_session(reference, threads=threads, session_options=reference_options,
                       target=target)
    loaded = time.perf_counter() - start
    cand_feed = random_input(cand, input_shape)
    ref_feed = random_input(ref, input_shape)
    warm = _time_runs(cand, cand_feed, max(warmup, 1)) + _time_runs(ref, ref_feed,
                                                                   max(warmup, 1))
    return _Pair(cand, cand_feed, ref, ref_feed, loaded, min(warm))


def _time_round(
    pair: _Pair, repeats: int, candidate_first: bool
) -> tuple[list[float], list[float]]:
    """One round's candidate and reference samples (ms), in the order given."""
    if candidate_first:
        mine = _time_runs(pair.cand, pair.cand_feed, repeats)
        theirs = _time_runs(pair.ref, pair.ref_feed, repeats)
    else:
        theirs = _time_runs(pair.ref, pair.ref_feed, repeats)
        mine = _time_runs(pair.cand, pair.cand_feed, repeats)
    return mine, theirs


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
    check_counts(repeats, warmup)
    if rounds < 1:
        raise InputError(f"rounds={rounds} must be >= 1 (try 5)")
    pair_args = (candidate, reference, input_shape, threads, candidate_options,
                 reference_options, warmup, target)
    pair = _open_pair(*pair_args)
    fresh = pair.loaded_s < FRESH_SESSION_LOAD_S
    repeats = runs_per_round(repeats, pair.fastest_ms)
    cand_samples: list[float] = []
    ref_samples: list[float] = []
    round_ratios: list[float] = []
    for r in range(rounds):
        if r and fresh:
            pair = _open_pair(*pair_args)
        mine, theirs = _time_round(pair, repeats, candidate_first=r % 2 == 0)
        cand_samples += mine
        ref_samples += theirs
        round_ratios.append(float(np.median(mine)) / float(np.median(theirs)))
    return InterleavedLatency(
        candidate=LatencyStats.from_samples(cand_samples),
        reference=LatencyStats.from_samples(ref_samples),
        ratio=float(np.median(round_ratios)),
        rounds=rounds,
        ratio_spread=float(np.subtract(*np.percentile(round_ratios, [75, 25]))),
    )


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
