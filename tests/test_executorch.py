"""The executorch-xnnpack target (issue 34): candidates lowered through torch.export to an
ExecuTorch program on XNNPACK at the plan's widths where XNNPACK has kernels, timed against
the fp32 program and scored on it, exported as model.pte and verified.

Skipped (with the reason) where ExecuTorch's runtime is missing; under
AUTOCOMPRESS_REQUIRE_SERVICES=1 (.ci/run) a missing runtime fails instead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pg import unavailable
from search_fixture import run_short_search
from torch import nn

from autocompress.cli import main
from autocompress.errors import InputError
from autocompress.export import export_from_storage
from autocompress.intake import Task
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import scoring, sessions, timing
from autocompress.study import attrs as trial_attrs

TARGET = executorch_runtime.TARGET


def _require_executorch() -> None:
    reason = executorch_runtime.unavailable_reason()
    if reason is not None:
        unavailable(f"{reason}: pip install -e '.[dev]' (or '.[executorch]')")


class _TinyCNN(nn.Module):
    """Two convolutions (the second with a residual add) and two linear layers on 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n].astype(np.float32) / 16.0
    return torch.from_numpy(images).unsqueeze(1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _TinyCNN().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity: folding matters
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = sessions.make_session(path, threads=1, target=TARGET)
    return session.run(None, {"input": x.numpy()})[0]


def test_fp32_program_matches_eager(tmp_path: Path) -> None:
    _require_executorch()
    from autocompress.transform.quantize.executorch_lower import FLOAT, lower_program

    model, x = _model(), _digits(40)
    info = lower_program(model, x[:1], tmp_path / "fp32.pte")
    assert info.path.is_file() and info.size_bytes == info.path.stat().st_size
    assert set(info.weight_types.values()) == {FLOAT} and not info.notes
    out = _run(tmp_path / "fp32.pte", x)  # 40 samples through a batch-1 program
    with torch.no_grad():
        want = model(x).numpy()
    assert out.shape == want.shape
    assert np.abs(out - want).max() < 1e-4


def test_mixed_plan_holds_int8_where_planned_and_says_why_not(tmp_path: Path) -> None:
    _require_executorch()
    from autocompress.transform.quantize import executorch_lower as lower

    model, x = _model(), _digits(200)
    bits = {"conv1": 8, "conv2": 32, "fc": 8, "head": 32}
    info = lower.lower_program(model, x[:1], tmp_path / "mixed.pte", bits, [x[:64]])
    assert info.weight_types == {"conv1": "INT8", "conv2": "FLOAT", "fc": "INT8",
                                 "head": "FLOAT"}
    assert info.activations["conv1"] == "INT8" and info.activations["conv2"] == "FLOAT"
    out = _run(info.path, x)
    with torch.no_grad():
        want = model(x).numpy()
    scale = float(np.abs(want).max())
    assert np.abs(out - want).max() < 0.1 * scale  # int8 error, not a different network
    assert (out.argmax(1) == want.argmax(1)).mean() > 0.9

    # int4: a convolution has no XNNPACK 4-bit kernel (stays float, noted); a linear layer
    # holds INT4 exactly when this build lowers 4-bit linear layers
    info4 = lower.lower_program(model, x[:1], tmp_path / "four.pte",
                                {"conv1": 4, "fc": 4}, [x[:16]])
    assert info4.weight_types["conv1"] == "FLOAT" and "int4" in info4.notes["conv1"]
    expected_fc = "INT4" if lower.int4_linear_supported() else "FLOAT"
    assert info4.weight_types["fc"] == expected_fc
    assert ("fc" in info4.notes) == (expected_fc == "FLOAT")


def test_program_sizes_follow_widths(tmp_path: Path) -> None:
    _require_executorch()
    from autocompress.transform.quantize.executorch_lower import lower_program

    model, x = _model(), _digits(32)
    fp32 = lower_program(model, x[:1], tmp_path / "a.pte")
    int8 = lower_program(model, x[:1], tmp_path / "b.pte", dict.fromkeys(
        ["conv1", "conv2", "fc", "head"], 8), [x])
    assert int8.size_bytes < 0.5 * fp32.size_bytes  # int8 weights: about a quarter


def test_missing_runtime_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(executorch_runtime, "unavailable_reason",
                        lambda: "executorch is not installed")
    with pytest.raises(InputError, match=f"the {TARGET} target needs ExecuTorch"):
        sessions.check_target(TARGET)
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--target", TARGET, "--trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    assert "executorch is not installed" in err[0]
    assert not list(tmp_path.iterdir())  # no study database, no artifacts


def test_a_missing_program_is_one_line(tmp_path: Path) -> None:
    _require_executorch()
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not used")
    with pytest.raises(InputError, match=r"model\.pte' does not exist"):
        sessions.make_session(onnx_path, threads=1, target=TARGET)


def test_search_export_verify_on_the_program(demo_task: Task, tmp_path: Path) -> None:
    """A demo search timed and scored on ExecuTorch programs, exported with model.pte and
    verified on it."""
    _require_executorch()
    short = run_short_search(tmp_path, study="et", target=TARGET, trials=3, guided=False,
                             budgets=())
    measured = [r for r in short.result.records if r.measured]
    assert any(r.baseline == "fp32" for r in measured)
    for r in measured:
        rt = r.json_attr(trial_attrs.RUNTIME)
        assert rt["target"] == TARGET and rt["runtime"] == "executorch"
        assert 0.8 < (r.accuracy or 0) <= 1 and r.latency_vs_fp32
        program = r.json_attr(executorch_runtime.PROGRAM_ATTR)
        assert program["weight_types"] == r.json_attr(trial_attrs.WEIGHT_TYPES)
        assert r.attrs[trial_attrs.SIZE] == program["size_bytes"]
    fp32 = next(r for r in measured if r.baseline == "fp32")
    assert set(fp32.json_attr(trial_attrs.WEIGHT_TYPES).values()) == {"FLOAT"}
    searched = [r for r in measured if r.baseline is None]
    assert searched and any("INT8" in r.json_attr(trial_attrs.WEIGHT_TYPES).values()
                            for r in searched)
    best = max(searched, key=lambda r: r.accuracy or 0)
    result = export_from_storage(short.storage_url, "et", out=tmp_path / "out",
                                 trial=best.number, verify=True)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["file"] == "model.pte"
    assert report["verification"]["test_accuracy"] == pytest.approx(best.test_accuracy)
    assert {"model.onnx", "model.pte"} <= set(result.files)
    # the recorded size is the program's bytes, and the written program is the measured one
    assert result.files["model.pte"]["bytes"] == best.attrs[trial_attrs.SIZE]
    assert (result.files["model.pte"]["sha256"]
            == best.attrs[executorch_runtime.ARTIFACT_SHA256_ATTR])
    x = next(iter(demo_task.data.batches("test", 16)))[0]
    got = scoring.raw_outputs(out / "model.pte", [x], threads=1, target=TARGET)
    assert got.shape[0] == 16
    # model.onnx opens the program beside it: the same program on both sides
    inter = timing.time_interleaved(out / "model.onnx", out / "model.pte",
                                    (1, *demo_task.input_shape),
                                    threads=1, rounds=1, repeats=3, target=TARGET)
    assert 0.5 < inter.ratio < 2.0
