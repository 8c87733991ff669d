"""The memory and time guard around third-party analyses (torch-pruning's DepGraph)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from torch import nn

from autocompress.model.guard import ResourceLimitError, limited


def test_memory_over_the_limit_is_stopped_and_the_limit_lifted() -> None:
    with pytest.raises(ResourceLimitError, match=r"the analysis needed more than 0\.2 GB more"):
        with limited("the analysis", memory_bytes=200 * 2**20):
            bytearray(2 * 2**30)
    assert len(bytearray(300 * 2**20)) == 300 * 2**20  # the limit is gone again


@pytest.mark.timeout(120, method="thread")  # the guard's timer needs SIGALRM to itself
def test_time_over_the_limit_is_stopped() -> None:
    started = time.perf_counter()
    with pytest.raises(ResourceLimitError, match=r"took longer than 0\.3 s"):
        with limited("the analysis", seconds=0.3):
            while time.perf_counter() - started < 30:
                pass
    assert time.perf_counter() - started < 5
    time.sleep(0.5)  # the timer is disarmed: nothing fires afterwards


def test_an_exploding_analysis_means_no_pruning_not_a_dead_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from autocompress.transform import prune

    def explode(model: Any, example: Any) -> Any:
        hoard = []
        while True:  # what DepGraph did on swin_t, up to 24 GB
            hoard.append(bytearray(64 * 2**20))

    monkeypatch.setattr(prune, "build_graph", explode)
    monkeypatch.setattr(prune, "analysis_limits", lambda: (512 * 2**20, 60.0))
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    groups = prune.dependency_groups(model, torch.randn(1, 3, 16, 16))
    assert groups and not any(g.prunable for g in groups)
    assert all("memory" in (g.excluded_reason or "") for g in groups)
    assert "structured pruning is off for this model" in caplog.text
