"""The command line: version/help, profile, and one-line exit-2 errors for bad intake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autocompress import __version__
from autocompress.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and __version__ in out
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for command in ("search", "show", "list", "profile", "dashboard", "export"):
        assert command in out


def test_console_script_runs() -> None:
    """The installed entry point (python -m form, so it works without the venv's bin/)."""
    proc = subprocess.run([sys.executable, "-m", "autocompress.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_profile_demo_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "profile", "--format", "json", "--repeats", "3")
    assert code == 0
    report = json.loads(out)
    shares = sum(row["latency_share"] for row in report["rows"])
    assert shares == pytest.approx(100, abs=0.5)  # percent
    assert report["total_flops"] > 0


def test_profile_resnet18_matches_fvcore(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "profile", "--model", "torchvision:resnet18", "--repeats", "2",
                        "--format", "table")
    assert code == 0
    assert "1.82" in out or "1,814" in out or "1814" in out  # fvcore: 1.82 GFLOPs at 224x224
    assert "multiply-add" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "torchvision:resnet1800"], "resnet1800"),
        (["--model", "nosuchpackage.mod:factory"], "nosuchpackage"),
        (["--model", "torchvision:resnet18", "--weights", "missing.pt"], "missing.pt"),
        (["--model", "torchvision:resnet18", "--input-shape", "1,64,64"], "1, 64, 64"),
    ],
)
def test_profile_bad_model_exits_2_in_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, _, err = _run(capsys, "profile", *args)
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_search_bad_data_root_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "search", "--storage", f"sqlite:///{tmp_path}/x.db",
                        "--model", "torchvision:resnet18", "--data",
                        f"imagefolder:{tmp_path}/nothing")
    assert code == 2 and "nothing" in err and len(err.splitlines()) == 1


def test_unknown_config_key_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("trails: 3\n")
    code, _, err = _run(capsys, "search", "--config", str(config))
    assert code == 2 and "'trails'" in err


def test_library_warnings_stay_out_of_stderr_unless_verbose() -> None:
    """ONNX Runtime's quantizer warns ~30 times a trial through the root logger."""
    import logging

    from autocompress.logs import library_noise as _library_noise

    def record(name: str, path: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1209, "Axis 1 is out-of-range", None, None)

    ort = "/venv/lib/python3.11/site-packages/onnxruntime/quantization/qdq_quantizer.py"
    assert not _library_noise(record("root", ort))
    assert _library_noise(record("root", ort, logging.ERROR))  # errors always shown
    assert _library_noise(record("autocompress", "/src/autocompress/search/loop.py"))
    assert _library_noise(record("root", "/home/me/train.py"))  # the user's own code


def test_an_unexpected_failure_is_one_line_and_traceback_with_v(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress import cli

    def broken(args: object) -> int:
        raise RuntimeError("named-tuple outputs\nsecond line")

    monkeypatch.setitem(cli._COMMANDS, "list", broken)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: RuntimeError: named-tuple outputs") and "-v" in err
    with pytest.raises(RuntimeError):
        cli.main(["-v", "list"])


def test_show_and_list_read_a_study_without_loading_torch(short_study: object) -> None:
    """Reading commands stay light: a study's table needs Optuna and SQL, not torch (which
    costs ~2 s to import)."""
    url = short_study.storage_url  # type: ignore[attr-defined]
    name = short_study.study  # type: ignore[attr-defined]
    script = (
        "import sys\n"
        "from autocompress.cli import main\n"
        f"codes = [main(['show', '--study', {name!r}, '--storage', {url!r}]),\n"
        f"         main(['list', '--storage', {url!r}])]\n"
        "print('RESULT', codes, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "RESULT [0, 0] False", out
