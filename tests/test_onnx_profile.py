"""``autocompress profile --onnx``: ONNX Runtime's profiler on the file that deploys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocompress.cli import main
from autocompress.runtime.onnx_profile import OVERHEAD, profile_onnx
from autocompress.transform import quantize


@pytest.fixture(scope="module")
def demo_files(demo_task, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx-profile")
    example = demo_task.data.example_input(1)
    fp32 = quantize.export_float_onnx(demo_task.model, example, folder / "fp32.onnx")
    calibration = [x for x, _ in demo_task.data.batches("train", 64)][:2]
    return fp32, quantize.ptq_static(fp32, folder / "int8.onnx", calibration)


def test_every_node_timed_and_shares_of_the_whole_run(demo_files: tuple[Path, Path]) -> None:
    fp32, int8 = demo_files
    report = profile_onnx(fp32, repeats=5)
    assert report.input_shape == [1, 8, 8]  # read off the file
    ops = {row.op_type for row in report.rows}
    assert "Conv" in ops and report.rows[-1].name == OVERHEAD
    assert sum(r.latency_share for r in report.rows) == pytest.approx(100.0, abs=0.5)
    assert all(r.latency_ms >= 0 for r in report.rows) and report.run_ms > 0
    quantized = profile_onnx(int8, repeats=5)
    # the int8 file runs integer kernels: ONNX Runtime fuses QDQ around Conv into QLinearConv
    assert any(op.startswith("QLinear") or op == "ConvInteger" for op in quantized.by_op)


def test_cli_json_and_bad_input(demo_files: tuple[Path, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    fp32, _ = demo_files
    assert main(["profile", "--onnx", str(fp32), "--repeats", "3", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"] and data["runs"] == 3
    assert main(["profile", "--onnx", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["profile", "--onnx", str(fp32), "--model", "torchvision:resnet18"]) == 2
    assert "drop --model" in capsys.readouterr().err


def test_openvino_profiles_its_compiled_graph(demo_files: tuple[Path, Path]) -> None:
    from pg import unavailable

    from autocompress.runtime.openvino import available

    if not available():
        unavailable("OpenVINO is not installed: pip install -e '.[dev]' (or '.[openvino]')")
    fp32, _ = demo_files
    report = profile_onnx(fp32, repeats=3, target="openvino-cpu")
    assert report.target == "openvino-cpu" and report.rows[-1].name == OVERHEAD
    assert "Convolution" in report.by_op  # OpenVINO's own op names
    assert sum(r.latency_share for r in report.rows) == pytest.approx(100.0, abs=0.5)


def test_profiling_on_a_gpu_target_is_refused(demo_files: tuple[Path, Path]) -> None:
    from autocompress.errors import InputError

    with pytest.raises(InputError):
        profile_onnx(demo_files[0], repeats=2, target="tensorrt")
