"""Deploy targets (issue 17): the study's runtime times and scores every file; a target this
machine cannot run is refused in one line before anything is made."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from pg import unavailable
from search_fixture import run_short_search

from autocompress.cli import main
from autocompress.errors import InputError
from autocompress.export import export_from_storage
from autocompress.runtime import scoring, sessions, timing
from autocompress.runtime.openvino import available as openvino_available
from autocompress.study import attrs as trial_attrs


@pytest.mark.parametrize("target,provider", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                             ("tensorrt", "TensorrtExecutionProvider")])
def test_a_gpu_target_without_a_gpu_is_one_line_exit_2(
    target: str, provider: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is available here: benchmarks/gpu.py exercises {target}")
    with pytest.raises(InputError, match=f"the {target} target needs an NVIDIA GPU"):
        sessions.check_target(target)
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--target", target, "--trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "GPU" in err[0]
    assert not list(tmp_path.iterdir())  # no study database, no artifacts


def test_unknown_target_is_refused() -> None:
    with pytest.raises(InputError, match="target 'edgetpu' is unknown"):
        sessions.check_target("edgetpu")


def test_openvino_target_search_export_verify(tmp_path: Path) -> None:
    """A demo search timed and scored by OpenVINO, exported and verified on OpenVINO."""
    if not openvino_available():
        unavailable("OpenVINO is not installed: pip install -e '.[dev]' (or '.[openvino]')")
    short = run_short_search(tmp_path, study="ov", target="openvino-cpu", trials=2,
                             guided=False, budgets=())
    measured = [r for r in short.result.records if r.measured]
    assert measured
    for r in measured:
        rt = r.json_attr(trial_attrs.RUNTIME)
        assert rt["target"] == "openvino-cpu" and rt["runtime"] == "openvino"
        assert 0.8 < (r.accuracy or 0) <= 1 and r.latency_vs_fp32
    best = max((r for r in measured if r.baseline is None), key=lambda r: r.accuracy or 0)
    result = export_from_storage(short.storage_url, "ov", out=tmp_path / "out",
                                 trial=best.number, verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.trial == best.number
    assert report["verification"]["test_accuracy"] == pytest.approx(best.test_accuracy)
    # OpenVINO's own format beside the ONNX file, listed with its checksum
    assert {"model.xml", "model.bin"} <= set(result.files)
    assert (tmp_path / "out" / "model.xml").is_file()


def test_openvino_and_onnxruntime_agree_on_a_quantized_file(demo_task, tmp_path: Path) -> None:
    if not openvino_available():
        unavailable("OpenVINO is not installed: pip install -e '.[dev]' (or '.[openvino]')")
    from autocompress.transform import quantize

    model = demo_task.model
    example = demo_task.data.example_input(1)
    float_path = quantize.export_float_onnx(model, example, tmp_path / "f.onnx")
    calibration = [x for x, _ in demo_task.data.batches("train", 64)][:2]
    int8 = quantize.ptq_static(float_path, tmp_path / "q.onnx", calibration)
    batches = list(demo_task.data.batches("val", 64))
    ov_acc = scoring.onnx_accuracy(int8, batches, threads=1, target="openvino-cpu")
    ort_acc = scoring.onnx_accuracy(int8, batches, threads=1)
    assert abs(ov_acc - ort_acc) < 0.02
    inter = timing.time_interleaved(int8, float_path, (1, *example.shape[1:]), threads=1,
                                     rounds=2, repeats=5, target="openvino-cpu")
    assert inter.ratio > 0


def test_gpu_benchmark_refuses_without_a_gpu_in_one_line() -> None:
    import subprocess
    import sys

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU with TensorRT is here: run benchmarks/gpu.py itself")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: the tensorrt target needs an NVIDIA GPU")


def test_tensorrt_builder_flags_follow_the_file() -> None:
    """fp16 allowed for every file; int8 only for QDQ files (explicit quantization); the
    engine cache is on only when an engine is to be written."""
    from autocompress.runtime import tensorrt as tensorrt_engine

    plain = tensorrt_engine.provider_options(qdq=False)
    assert plain == {"trt_fp16_enable": "True", "trt_int8_enable": "False"}
    cached = tensorrt_engine.provider_options(qdq=True, engine_dir=Path("/x/tensorrt"))
    assert cached["trt_int8_enable"] == "True" and cached["trt_engine_cache_enable"] == "True"
    assert cached["trt_engine_cache_path"] == "/x/tensorrt"
    first, *rest = tensorrt_engine.providers(qdq=True)
    assert first[0] == "TensorrtExecutionProvider" and rest == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    info = sessions.runtime_info(1, 1, target="tensorrt")
    assert info["builder_flags"]["fp16"] is True


def test_tensorrt_engine_is_saved_beside_the_file(demo_task, tmp_path: Path) -> None:
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no TensorrtExecutionProvider here (needs an NVIDIA GPU and "
                    "onnxruntime-gpu); benchmarks/gpu.py exercises it on a GPU machine")
    from autocompress.runtime import tensorrt as tensorrt_engine
    from autocompress.transform import quantize

    example = demo_task.data.example_input(1)
    path = quantize.export_float_onnx(demo_task.model, example, tmp_path / "model.onnx")
    names = tensorrt_engine.save_engine(path, tmp_path, tuple(example.shape[1:]), qdq=False)
    assert any(n.endswith(".engine") for n in names) and names[-1] == "tensorrt/build.json"
    build = json.loads((tmp_path / "tensorrt" / "build.json").read_text())
    assert build["flags"] == {"fp16": True, "int8": False}
