"""measure.py: statistics, sizes, parameter and FLOP counts, packing limit."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autocompress.model.plan import CompressionPlan
from autocompress.runtime.measure import (
    LatencyStats,
    count_flops,
    count_params,
    file_size,
    packing_limit_bytes,
    zipped_size,
)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # 36 + 4 params
        self.fc = nn.Linear(4 * 8 * 8, 10)  # 2560 + 10 params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_latency_stats_from_samples() -> None:
    stats = LatencyStats.from_samples(list(range(1, 11)))  # 1..10 ms
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.spread_ms == pytest.approx(np.percentile(range(1, 11), 75) - 3.25)
    assert stats.p10_ms == pytest.approx(1.9)
    assert stats.p90_ms == pytest.approx(9.1)
    assert stats.repeats == 10
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.to_dict() == {
        "median_ms": stats.median_ms,
        "spread_ms": stats.spread_ms,
        "p10_ms": stats.p10_ms,
        "p90_ms": stats.p90_ms,
        "repeats": 10,
    }


def test_latency_stats_is_robust_to_one_outlier() -> None:
    samples = [1.0] * 19 + [500.0]
    stats = LatencyStats.from_samples(samples)
    assert stats.median_ms == 1.0 and stats.spread_ms == 0.0


def test_latency_stats_needs_samples() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LatencyStats.from_samples([])


def test_file_and_zipped_size(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.bin"
    sparse.write_bytes(bytes(100_000))  # all zeros: what 90% unstructured sparsity looks like
    dense = tmp_path / "dense.bin"
    dense.write_bytes(os.urandom(100_000))
    assert file_size(sparse) == 100_000 == file_size(dense)
    assert zipped_size(sparse) < 2_000
    assert zipped_size(dense) >= 100_000  # random bytes do not compress (zip adds headers)


def test_count_params() -> None:
    assert count_params(Small()) == 36 + 4 + 2560 + 10


def test_count_flops_conv_and_linear() -> None:
    model = Small()
    # conv: 4 out x 64 positions x 9 taps = 2304 MACs; fc: 256 x 10 = 2560 MACs.
    assert count_flops(model, torch.randn(1, 1, 8, 8)) == 2304 + 2560
    assert model.training, "count_flops must restore the training flag"


def test_packing_limit_bytes() -> None:
    model = Small()
    plan = CompressionPlan(bits={"conv": 4, "fc": 8})
    expected = math.ceil(36 * 4 / 8) + 4 * 4 + 2560 * 8 / 8 + 10 * 4
    assert packing_limit_bytes(model, plan) == expected
    assert packing_limit_bytes(model, CompressionPlan()) == 4 * count_params(model)


def test_packing_limit_counts_recurrent_and_attention_weights_at_their_planned_width() -> None:
    """An LSTM's weight_ih_l0/weight_hh_l0 and an attention's in_proj_weight counted 32 bits
    whatever the plan said: a size refusal named a 163.8 KB limit for a 50 KB file."""
    from torch import nn

    class _Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    model = _Seq()
    plan = CompressionPlan(bits={"lstm": 8, "attn": 4, "attn.out_proj": 8})
    lstm_w = 4 * 16 * 8 + 4 * 16 * 16
    expected_bits = (lstm_w * 8 + 2 * 4 * 16 * 32  # weights at 8; both biases float
                     + 3 * 16 * 16 * 4 + 3 * 16 * 32  # in_proj at 4, its bias float
                     + 16 * 16 * 8 + 16 * 32)  # out_proj at 8, its bias float
    assert packing_limit_bytes(model, plan) == math.ceil(expected_bits / 8)
