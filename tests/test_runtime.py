"""runtime: sessions, accuracy, latency statistics and session-option choice on real files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from autocompress.errors import InputError
from autocompress.runtime import scoring, sessions, timing
from autocompress.runtime.measure import LatencyStats
from autocompress.transform import quantize

INPUT_SHAPE = (1, 1, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images[:400], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(data.target[:400], dtype=torch.int64)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, digits: tuple) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Net().eval()
        folder = tmp_path_factory.mktemp("runtime")
        fp32 = quantize.export_float_onnx(model, digits[0][:1], folder / "fp32.onnx")
        int8 = quantize.ptq_static(fp32, folder / "int8.onnx", [digits[0][:64]])
    finally:
        torch.set_num_threads(threads)
    return {"fp32": fp32, "int8": int8}


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 100) -> Iterator[tuple]:
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


def test_predictions_and_accuracy_agree(files: dict[str, Path], digits: tuple) -> None:
    x, y = digits
    pred = scoring.predictions(files["fp32"], (b for b, _ in _batches(x, y)))
    assert pred.shape == (400,) and pred.dtype == np.int64
    expected = float((pred == y.numpy()).mean())
    assert scoring.onnx_accuracy(files["fp32"], _batches(x, y)) == pytest.approx(expected)
    # numpy labels and arrays are accepted too
    numpy_batches = [(bx.numpy(), by.numpy()) for bx, by in _batches(x, y)]
    assert scoring.onnx_accuracy(files["fp32"], numpy_batches) == pytest.approx(expected)


def test_accuracy_errors_name_the_problem(files: dict[str, Path], digits: tuple) -> None:
    with pytest.raises(InputError, match="no samples"):
        scoring.onnx_accuracy(files["fp32"], [])
    with pytest.raises(InputError, match=r"\(x, y\)"):
        scoring.onnx_accuracy(files["fp32"], [digits[0][:4]])
    with pytest.raises(InputError, match="does not exist"):
        sessions.make_session(Path("/nonexistent/model.onnx"))
    with pytest.raises(InputError, match="threads"):
        sessions.make_session(files["fp32"], threads=0)


def test_time_latency_stats(files: dict[str, Path]) -> None:
    stats = timing.time_latency(files["int8"], INPUT_SHAPE, threads=1, repeats=20, warmup=3)
    assert isinstance(stats, LatencyStats)
    assert stats.repeats == 20
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.spread_ms >= 0
    with pytest.raises(InputError, match="repeats"):
        timing.time_latency(files["int8"], INPUT_SHAPE, repeats=0)


def test_time_interleaved_file_against_itself(files: dict[str, Path]) -> None:
    result = timing.time_interleaved(
        files["fp32"], files["fp32"], (4, 1, 8, 8), threads=1, rounds=4, repeats=15, warmup=3
    )
    # a model this small runs ~0.05 ms: 15 runs would be under a millisecond of timing, so
    # every round runs up to the floor (and both sides the same number of runs)
    assert result.candidate.repeats == result.reference.repeats
    assert result.candidate.repeats % 4 == 0 and result.candidate.repeats > 60
    per_round_ms = result.candidate.repeats / 4 * result.candidate.median_ms
    assert per_round_ms >= timing.MIN_ROUND_TIMING_S * 1000 / 3
    assert 0.5 <= result.ratio <= 2.0
    assert set(result.to_dict()) == {"candidate", "reference", "ratio", "rounds"}


def test_runs_per_round_reach_the_timing_floor() -> None:
    floor_ms = timing.MIN_ROUND_TIMING_S * 1000
    assert timing.runs_per_round(6, 0.1) == round(floor_ms / 0.1)  # tiny model: more runs
    assert timing.runs_per_round(6, floor_ms) == 6  # slow model: repeats as asked
    assert timing.runs_per_round(6, 1e-6) == timing.MAX_RUNS_PER_ROUND
    assert timing.runs_per_round(6, 0.0) == timing.MAX_RUNS_PER_ROUND


def test_time_interleaved_fresh_sessions_and_median_of_rounds(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cheap-to-load file gets a fresh session pair every round, and the ratio is the
    median of the rounds' ratios: one round on an unlucky reference session (here 3x
    faster) does not move the verdict, where pooling every sample would."""
    reference = str(files["int8"])
    is_reference: dict[int, bool] = {}
    opened: list[object] = []  # kept alive, so no id is reused
    real_make = sessions.make_session

    def tracking_make(path: Path, **kwargs: object) -> object:
        session = real_make(path, **kwargs)
        opened.append(session)
        is_reference[id(session)] = str(path) == reference
        return session

    timed_reference_rounds = {"n": 0}

    def fake_runs(session: object, feed: object, runs: int) -> list[float]:
        if runs == 3:  # warm-up: slow enough that 10 runs pass the per-round timing floor
            return [5.0] * runs
        if not is_reference[id(session)]:
            return [1.0] * runs
        timed_reference_rounds["n"] += 1
        return [0.6 if timed_reference_rounds["n"] == 2 else 2.0] * runs

    monkeypatch.setattr(timing, "make_session", tracking_make)
    monkeypatch.setattr(timing, "_time_runs", fake_runs)
    monkeypatch.setattr(timing, "FRESH_SESSION_LOAD_S", 60.0)  # a loaded machine: still fresh
    result = timing.time_interleaved(files["fp32"], files["int8"], (4, 1, 8, 8), threads=1,
                                      rounds=5, repeats=10, warmup=3)
    assert len(opened) == 10 and sum(is_reference.values()) == 5  # a pair a round
    assert result.ratio == pytest.approx(0.5)  # median of [0.5, 1.67, 0.5, 0.5, 0.5]
    assert result.reference.repeats == result.candidate.repeats == 50


def test_pick_session_options(files: dict[str, Path]) -> None:
    options, stats = timing.pick_session_options(
        files["int8"], INPUT_SHAPE, threads=1, rounds=2, repeats=10
    )
    assert options in ({}, sessions.DISABLE_QDQ_OPTION)
    assert stats.median_ms > 0 and stats.repeats >= 20 and stats.repeats % 2 == 0
    # The chosen options must give a working session with the same predictions.
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    a = sessions.make_session(files["int8"], session_options=options).run(None, {"input": x})
    assert a[0].shape == (8, 10)
    # A float file has no QDQ nodes: nothing to choose, defaults are returned.
    assert sessions.has_qdq(files["int8"]) and not sessions.has_qdq(files["fp32"])
    options, _ = timing.pick_session_options(files["fp32"], INPUT_SHAPE, threads=1, repeats=5)
    assert options == {}


def test_runtime_info_keys() -> None:
    info = sessions.runtime_info(2, 1, {"session.disable_quant_qdq": "1"})
    for key in (
        "runtime",
        "version",
        "providers",
        "session_options",
        "threads",
        "batch_size",
        "cpu",
    ):
        assert key in info
    assert info["runtime"] == "onnxruntime"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["session_options"] == {"session.disable_quant_qdq": "1"}
    assert info["threads"] == 2 and info["batch_size"] == 1
    assert isinstance(info["cpu"], str) and info["cpu"]
