"""The guide's metrics: defined once (metrics.py), the same figures in every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from search_fixture import ShortStudy
from test_export import qat_trial
from torch import nn

from autocompress import api, cli
from autocompress.dashboard import create_app
from autocompress.model.plan import CompressionPlan
from autocompress.results import metrics


def test_rates_follow_the_guide() -> None:
    assert metrics.accuracy_drop_rate(0.90, 0.87) == pytest.approx(0.03 / 0.90)
    assert metrics.accuracy_drop_rate(0.90, 0.91) == pytest.approx(-0.01 / 0.90)  # a gain
    assert metrics.reduction_rate(100.0, 25.0) == 0.75
    assert metrics.reduction_rate(None, 25.0) is None
    assert metrics.reduction_rate(0.0, 25.0) is None


def test_times_smaller_and_faster_and_what_the_trial_page_adds() -> None:
    assert metrics.times_smaller(400.0, 100.0) == 4.0
    assert metrics.times_smaller(None, 100.0) is None and metrics.times_smaller(400.0, 0) is None
    assert metrics.times_faster(0.5) == 2.0 and metrics.times_faster(None) is None
    fp32 = {"number": 0, "accuracy": 0.9, "size_bytes": 400.0, "test_accuracy": 0.88,
            "zip_size_bytes": 360.0, "params": 1000, "latency_ms": 2.0}
    row = {"accuracy": 0.87, "size_bytes": 100.0, "test_accuracy": 0.86, "zip_size_bytes": 90.0,
           "params": 250, "latency_ms": 1.0, "latency_vs_fp32": None}
    vs = metrics.row_versus_fp32(row, fp32)
    assert vs["times_smaller"] == 4.0 and vs["zip_times_smaller"] == 4.0
    assert vs["params_times_fewer"] == 4.0
    assert vs["test_accuracy_change_points"] == pytest.approx(-2.0)
    # no interleaved ratio: the speed falls back to the fp32 trial's own latency
    assert vs["times_faster"] == 2.0 and vs["latency_basis"] == "fp32 baseline trial #0"
    assert metrics.row_versus_fp32(row, None)["zip_times_smaller"] is None


def test_layer_macs_and_bit_operations() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    macs = metrics.layer_macs(model, torch.zeros(2, 3, 4, 4))  # per sample, not per batch
    assert macs == {"0": 8 * 4 * 4 * 3 * 3 * 3, "3": 10 * 128}

    fp32 = metrics.bit_operations(macs, CompressionPlan())
    assert fp32 == (3456 + 1280) * 32 * 32
    int8 = metrics.bit_operations(macs, CompressionPlan(bits={"0": 8, "3": 8}))
    assert int8 == (3456 + 1280) * 8 * 8
    # int4 weight-only: float activations; a float layer stays 32 x 32
    mixed = CompressionPlan(bits={"0": 4}, activation_bits=32)
    assert metrics.bit_operations(macs, mixed) == 3456 * 4 * 32 + 1280 * 32 * 32


def test_show_dashboard_and_report_agree_on_the_rates(
    short_study: ShortStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = qat_trial(short_study)
    assert record.bops is not None and record.flops is not None

    code = cli.main(["show", "--study", short_study.study, "--storage",
                     short_study.storage_url, "--all", "--json"])
    assert code == 0
    shown = next(r for r in json.loads(capsys.readouterr().out)
                 if r["trial"] == record.number)

    client = create_app(short_study.storage_url).test_client()
    trial = client.get(f"/api/trial/{short_study.study}/{record.number}").get_json()
    row = next(t for t in client.get(f"/api/study/{short_study.study}").get_json()["trials"]
               if t["number"] == record.number)

    handle = api.load_study(short_study.study, short_study.storage_url)
    handle.export(record, tmp_path / "out", verify=False)
    candidate = json.loads((tmp_path / "out" / "report.json").read_text())["candidate"]

    for key, report_key in (("accuracy_drop_rate", "accuracy_drop_rate_val"),
                            ("flop_reduction_rate", "flop_reduction_rate"),
                            ("bops_reduction_rate", "bops_reduction_rate")):
        value = shown[key]
        assert value is not None, key
        assert trial["comparison"][key] == pytest.approx(value), key
        assert row[key] == pytest.approx(value), key
        assert candidate[report_key] == pytest.approx(value), key
    # quantized: fewer bit-operations than fp32 even where the FLOPs are the same
    assert shown["bops_reduction_rate"] > 0.5
    # "x smaller" and "x faster" come from the same place (results.metrics) everywhere
    for key in ("times_smaller", "times_faster"):
        assert shown[key] is not None, key
        assert trial["comparison"][key] == pytest.approx(shown[key]), key
        assert candidate[key] == pytest.approx(shown[key]), key
    assert row["times_faster"] == pytest.approx(shown["times_faster"])
