"""The service with every real component a deployment has: a real PostgreSQL holding the
queue and the job studies, S3-compatible storage (moto's server mode: a real HTTP endpoint,
reached through boto3 as MinIO would be) holding uploads and artifacts, a real HTTP server
on a port and a worker. One tiny demo job, submitted with an uploaded file, runs to done;
its artifact and its export come back from S3."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_http import live_service

from tests import pg

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    try:
        import boto3
        from moto import server as moto_server
    except ImportError as exc:  # skips on a laptop without the dev extras; fails under CI
        pg.unavailable(f"S3 tests need moto's server mode: pip install 'moto[server]' ({exc})")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                           ("AWS_SECRET_ACCESS_KEY", "test"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="jobs")
        yield endpoint
    finally:
        server.stop()


def test_a_job_runs_on_postgresql_with_its_files_in_s3(
        tmp_path: Path, s3_endpoint: str) -> None:
    import boto3
    import numpy as np
    import torch

    from autocompress.intake.demo import DemoNet

    url = pg.server_url()
    weights = tmp_path / "demo.pt"
    torch.manual_seed(0)
    torch.save(DemoNet().state_dict(), weights)  # an uploaded state_dict for the demo model
    with pg.fresh_database(url) as db, live_service(
            db, tmp_path, embedded_workers=1, artifacts="s3://jobs/service") as svc:
        with weights.open("rb") as handle:
            response = svc.call(
                "POST", "/api/v1/jobs", files={"weights": ("demo.pt", handle)},
                data={"spec": '{"model": "demo", "trials": 2, "finetune_steps": 10, '
                              '"latency_repeats": 3}'})
        assert response.status_code == 201, response.text
        job_id = response.json()["job"]["id"]
        deadline = time.monotonic() + 240
        job = {}
        while time.monotonic() < deadline:
            job = svc.call("GET", f"/api/v1/jobs/{job_id}").json()["job"]
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(1)
        assert job["state"] == "done", job
        assert job["front"]
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket="jobs", Prefix="service/").get("Contents", [])]
        # the trials' files are in S3 (the upload went there too: the worker, which has no
        # other way to reach it, loaded it; the service discards it once the job is done)
        assert len(keys) >= 2, keys
        number = job["front"][0]["number"]
        got = svc.call("GET", f"/api/v1/jobs/{job_id}/artifacts/{number}/model.onnx")
        assert got.status_code == 200
        assert hashlib.sha256(got.content).hexdigest() == got.headers["X-Artifact-SHA256"]
        assert svc.call("GET", f"/api/v1/jobs/{job_id}/artifacts/{number}/model.onnx",
                        "beta").status_code == 404
        assert np.isfinite(job["front"][0]["accuracy"])
