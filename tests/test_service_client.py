"""The service's command-line client (``submit``, ``jobs``, ``watch``, ``cancel``, ``fetch``)
against a real server on a port: the search's flags, local files uploaded (a folder zipped),
exit codes, one-line errors; and one real search end to end through ``serve``'s embedded
worker, fetched as a verified export (the only slow test here)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from service_http import LiveService, live_service

from autocompress.cli import main
from autocompress.errors import InputError
from autocompress.service.client import ServiceClient, ServiceError, safe_unzip


@pytest.fixture()
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveService]:
    with live_service(f"sqlite:///{tmp_path / 'service.db'}", tmp_path) as service:
        monkeypatch.setenv("AUTOCOMPRESS_SERVER", service.url)
        monkeypatch.setenv("AUTOCOMPRESS_TOKEN", service.tokens["alpha"])
        yield service


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_jobs_and_cancel(svc: LiveService, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "submit", "--trials", "2", "--finetune-steps", "10",
                          "--budget", "200kB", "--objectives", "accuracy,size")
    assert code == 0, err
    job_id = out.strip()
    job = svc.store.job("alpha", job_id)
    assert job is not None and job.state == "queued"
    assert job.spec["budgets"] == ["200kB"] and job.spec["finetune_steps"] == 10
    code, out, _ = _run(capsys, "jobs")
    assert code == 0 and job_id in out and "queued" in out
    code, out, _ = _run(capsys, "jobs", "--json")
    assert [j["id"] for j in json.loads(out)] == [job_id]
    code, out, _ = _run(capsys, "cancel", job_id)
    assert code == 0 and "cancelled" in out
    assert svc.store.job("alpha", job_id).state == "cancelled"


def test_submit_uploads_a_local_data_folder_zipped(
        svc: LiveService, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "flowers"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            (folder / split / label / "x.png").write_bytes(b"\x89PNG fake")
    code, out, err = _run(capsys, "submit", "--data", str(folder), "--trials", "2")
    assert code == 0, err
    job = svc.store.job("alpha", out.strip())
    assert job.spec["data"] == "upload" and job.spec["uploads"] == {"data": "flowers.zip"}
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\ngood,1\nbad,0\n")
    code, out, err = _run(capsys, "submit", "--data", f"text:{csv}?text=text&label=label",
                          "--model", "hf:prajjwal1/bert-tiny")
    assert code == 0, err
    job = svc.store.job("alpha", out.strip())
    assert job.spec["uploads"] == {"data": "reviews.csv"}
    assert job.spec["data_options"] == "text=text&label=label"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_input_is_one_line_and_exit_2(
        svc: LiveService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "submit", "--budget", "fast")
    assert code == 2 and err.count("\n") == 1 and "budget 'fast'" in err
    code, _, err = _run(capsys, "submit", "--weights", str(tmp_path / "missing.pt"))
    assert code == 2 and "--weights" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "watch", "0123456789ab")
    assert code == 2 and "no job 0123456789ab" in err
    monkeypatch.setenv("AUTOCOMPRESS_TOKEN", "ac_wrong")
    code, _, err = _run(capsys, "jobs")
    assert code == 2 and "token" in err and err.count("\n") == 1
    monkeypatch.delenv("AUTOCOMPRESS_TOKEN")
    code, _, err = _run(capsys, "jobs")
    assert code == 2 and "AUTOCOMPRESS_TOKEN" in err and err.count("\n") == 1
    monkeypatch.setenv("AUTOCOMPRESS_TOKEN", svc.tokens["alpha"])
    closed = f"http://127.0.0.1:{_free_port()}"
    code, _, err = _run(capsys, "jobs", "--server", closed)
    assert code == 2 and closed in err and err.count("\n") == 1
    assert svc.store.jobs("alpha") == []


def test_watch_exits_0_when_done_and_1_when_cancelled(
        svc: LiveService, capsys: pytest.CaptureFixture[str]) -> None:
    job = svc.submit()

    def drive() -> None:  # the worker's side, while watch follows in the main thread
        time.sleep(1.0)
        assert svc.store.claim("w") is not None
        time.sleep(1.0)
        svc.store.release("w", job["id"], "done", seconds=1.0, trials=2)

    driver = threading.Thread(target=drive)
    driver.start()
    code, out, _ = _run(capsys, "watch", job["id"])
    driver.join(timeout=30)
    assert code == 0 and f"job {job['id']} done" in out
    other = svc.submit()
    _run(capsys, "cancel", other["id"])
    code, out, _ = _run(capsys, "watch", other["id"])
    assert code == 1 and "cancelled" in out


def test_serve_command_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "autocompress", "serve", "--storage",
           f"sqlite:///{tmp_path / 'service.db'}", "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        first = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in first, first + process.stderr.read()
        banner = first + process.stdout.readline() + process.stdout.readline()
        doc = requests.get(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=10)
        assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.1")
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", timeout=10
                            ).status_code == 401
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "1 embedded worker" in banner and "admin token create" in banner
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # SQLite serves one worker: asking for two is a one-line refusal before serving
    refused = subprocess.run([*cmd, "--embedded-workers", "2"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "SQLite serves one worker" in refused.stderr


def test_safe_unzip_refuses_members_that_escape(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("model.onnx", b"ok")
        zf.writestr("../escaped.txt", b"no")
    with pytest.raises(ServiceError, match="unsafe member"):
        safe_unzip(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.txt").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("tensorrt/build.json", b"{}")
        zf.writestr("model.onnx", b"ok")
    assert sorted(safe_unzip(good, tmp_path / "out")) == ["model.onnx", "tensorrt/build.json"]


@pytest.mark.slow
def test_serve_runs_a_demo_job_to_done_and_fetch_gets_a_verified_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with live_service(f"sqlite:///{tmp_path / 'service.db'}", tmp_path,
                      embedded_workers=1) as svc:
        monkeypatch.setenv("AUTOCOMPRESS_SERVER", svc.url)
        monkeypatch.setenv("AUTOCOMPRESS_TOKEN", svc.tokens["alpha"])
        code, out, err = _run(capsys, "submit", "--trials", "2", "--finetune-steps", "10",
                              "--latency-repeats", "3")
        assert code == 0, err
        job_id = out.strip()
        code, out, err = _run(capsys, "watch", job_id)
        assert code == 0, out + err
        assert "trial 0" in out and f"job {job_id} done" in out
        job = svc.call("GET", f"/api/v1/jobs/{job_id}").json()["job"]
        assert job["state"] == "done" and job["front"], job
        code, out, err = _run(capsys, "fetch", job_id, "--out", str(tmp_path / "export"))
        assert code == 0, err
        report = json.loads((tmp_path / "export" / "report.json").read_text())
        assert report["verification"] and (tmp_path / "export" / "model.onnx").is_file()
        # the front's artifact downloads with the checksum its trial recorded
        number = job["front"][0]["number"]
        response = svc.call("GET", f"/api/v1/jobs/{job_id}/artifacts/{number}/model.onnx")
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == \
            response.headers["X-Artifact-SHA256"]
        # the other project still sees nothing of it
        assert svc.call("GET", f"/api/v1/jobs/{job_id}/artifacts/{number}/model.onnx",
                        "beta").status_code == 404


class _NotJson(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>a proxy's page</html>")

    def log_message(self, *args: object) -> None:
        pass


def test_client_failures_are_one_line_service_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotJson)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(ServiceError, match=f"service at {url} answered"):
            ServiceClient(url, "ac_x").jobs()
        with pytest.raises(ServiceError, match=r"service at http: failed \(") as bad:
            ServiceClient("http://", "ac_x").jobs()  # no host: requests' InvalidURL
        assert "\n" not in str(bad.value)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(InputError, match="not a project token"):
        ServiceClient(url, "ac_bad token\u00e9")
    monkeypatch.setenv("AUTOCOMPRESS_TOKEN", "my token")
    code, _, err = _run(capsys, "jobs", "--server", url)
    assert code == 2 and "not a project token" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "submit", "--task", "t.py:make")  # the service refuses it
    assert code == 2 and "unrecognized arguments: --task" in err
