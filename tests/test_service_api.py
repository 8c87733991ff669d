"""The service's HTTP API on a real server (werkzeug on a free port) over a real SQLite file
and a real PostgreSQL database: submit and list, refusals that name the field and queue
nothing, projects kept apart (another project's job is the same 404 as an unknown one on
every route and page), tokens, the OpenAPI document and the server-sent events of a job
driven through the store."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy
from pg import fresh_database
from service_http import LiveService, live_service

from autocompress.service import app_events, app_state
from autocompress.service.client import parse_events
from autocompress.service.uploads import UploadLimits


@pytest.fixture()
def svc(tmp_path: Path) -> Iterator[LiveService]:
    with live_service(f"sqlite:///{tmp_path / 'service.db'}", tmp_path) as service:
        yield service


def _error(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "field"} and "\n" not in body["error"]
    assert "Traceback" not in body["error"]
    return body


def test_submit_returns_201_and_the_job_is_listed(svc: LiveService) -> None:
    job = svc.submit(budgets=["200kB"])
    assert job["state"] == "queued" and len(job["id"]) == 12
    assert job["progress"] == {"trials_done": 0, "trials_target": 2, "seconds_used": 0.0,
                               "time_limit_s": None}
    listed = svc.call("GET", "/api/v1/jobs").json()
    assert listed["project"] == "alpha"
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    read = svc.call("GET", f"/api/v1/jobs/{job['id']}").json()["job"]
    assert read["state"] == "queued" and read["front"] == [] and read["error"] is None
    assert read["export"]["state"] == "none"
    assert read["spec"]["budgets"] == ["200kB"]
    # the other project sees none of it
    assert svc.call("GET", "/api/v1/jobs", "beta").json()["jobs"] == []


@pytest.mark.parametrize(("body", "content_type", "status", "field"), [
    (b"{not json", "application/json", 400, None),
    (b"[1, 2]", "application/json", 400, None),
    (b"[" * 100_000, "application/json", 400, None),
    (b'{"trials": 2, "time_limit": Infinity}', "application/json", 400, "time_limit"),
    (json.dumps({"trials": 10_001}).encode(), "application/json", 400, "trials"),
    (json.dumps({"trials": 2, "colour": "red"}).encode(), "application/json", 400, "colour"),
    (json.dumps({"budgets": ["fast"]}).encode(), "application/json", 400, "budgets"),
    (json.dumps({"trials": -1}).encode(), "application/json", 400, "trials"),
    (json.dumps({"storage": "sqlite:///x.db"}).encode(), "application/json", 400, "storage"),
    (json.dumps({"data": "imagefolder:/etc"}).encode(), "application/json", 400, "data"),
    (json.dumps({"model": "/srv/model.py:build"}).encode(), "application/json", 400, "model"),
    (json.dumps({"data": "dataset:nope"}).encode(), "application/json", 400, "data"),
    (b"trials=2", "text/plain", 415, None),
])
def test_refused_submission_names_the_field_and_queues_nothing(
    svc: LiveService, body: bytes, content_type: str, status: int, field: str | None
) -> None:
    response = svc.call("POST", "/api/v1/jobs", data=body,
                        headers={"Content-Type": content_type})
    assert _error(response, status)["field"] == field
    assert svc.call("GET", "/api/v1/jobs").json()["jobs"] == []
    assert svc.store.jobs("alpha") == []


def test_refused_upload_keeps_nothing(svc: LiveService) -> None:
    files = {"data": ("digits.exe", b"MZ...", "application/octet-stream")}
    response = svc.call("POST", "/api/v1/jobs", data={"spec": json.dumps({"trials": 2})},
                        files=files)
    assert _error(response, 400)["field"] == "data"
    response = svc.call("POST", "/api/v1/jobs", data={"spec": "{}"},
                        files={"notes": ("a.txt", b"x")})
    assert _error(response, 400)["field"] == "notes"
    assert svc.store.jobs("alpha") == []
    uploads = svc.artifacts / "service-uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_upload_over_its_limit_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    limits = UploadLimits(data_bytes=1000, weights_bytes=1000, code_bytes=1000)
    with live_service(f"sqlite:///{tmp_path / 'service.db'}", tmp_path,
                      upload_limits=limits) as svc:
        response = svc.call("POST", "/api/v1/jobs", data={"spec": json.dumps({"trials": 2})},
                            files={"data": ("big.csv", b"text,label\n" + b"x,1\n" * 2000)})
        assert _error(response, 400)["field"] == "data"
        assert svc.store.jobs("alpha") == []
        uploads = svc.artifacts / "service-uploads"
        assert not uploads.exists() or not any(uploads.iterdir())


def test_unknown_routes_methods_and_tokens_are_json(svc: LiveService) -> None:
    assert "no route" in _error(svc.call("GET", "/api/v1/nothing"), 404)["error"]
    response = svc.call("DELETE", "/api/v1/jobs")
    assert "not allowed" in _error(response, 405)["error"]
    for headers in ({}, {"Authorization": "Bearer ac_not-a-token"},
                    {"X-Autocompress-Token": "nope"}):
        response = svc.call("GET", "/api/v1/jobs", None, headers=headers)
        assert "token" in _error(response, 401)["error"]
    page = svc.call("GET", "/jobs", None)
    assert page.status_code == 401 and 'name="token"' in page.text  # the login form
    # a revoked token is unknown (within the server's 5 s token cache)
    token_id, secret = svc.store.create_token("alpha", "short-lived")
    assert svc.call("GET", "/api/v1/jobs", None,
                    headers={"X-Autocompress-Token": secret}).status_code == 200
    svc.store.revoke_token(token_id)
    time.sleep(5.2)
    assert svc.call("GET", "/api/v1/jobs", None,
                    headers={"X-Autocompress-Token": secret}).status_code == 401


def test_token_in_query_becomes_a_strict_cookie(svc: LiveService) -> None:
    session = requests.Session()
    first = session.get(f"{svc.url}/jobs?token={svc.tokens['alpha']}", allow_redirects=False)
    assert first.status_code == 303 and first.headers["Location"] == "/jobs"
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = session.get(f"{svc.url}/jobs")
    assert page.status_code == 200 and "alpha" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    # the cookie alone cannot POST from elsewhere (no Origin: refused); from the page it can
    refused = session.post(f"{svc.url}/api/v1/jobs", json={"trials": 2})
    assert _error(refused, 403)["field"] is None
    same = session.post(f"{svc.url}/api/v1/jobs", json={"trials": 2},
                        headers={"Origin": svc.url})
    assert same.status_code == 201


def test_openapi_document_lists_the_routes(svc: LiveService) -> None:
    response = svc.call("GET", "/api/v1/openapi.json", None)
    assert response.status_code == 200
    doc = json.loads(response.text)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {
        "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events",
        "/api/v1/jobs/{job_id}/cancel", "/api/v1/jobs/{job_id}/export",
        "/api/v1/jobs/{job_id}/artifacts/{trial}/{name}", "/api/v1/openapi.json"}
    assert set(doc["paths"]["/api/v1/jobs"]) == {"get", "post"}


def _cross_project_requests(job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"/api/v1/jobs/{job_id}"
    return [
        ("GET", base, {}),
        ("GET", f"{base}/events", {}),
        ("POST", f"{base}/cancel", {}),
        ("POST", f"{base}/export", {"json": {"best": True}}),
        ("POST", f"{base}/export", {"json": {"trial": 0}}),
        ("GET", f"{base}/export", {}),
        ("GET", f"{base}/artifacts/0/model.onnx", {}),
        ("GET", f"{base}/artifacts/1/state_dict.pt", {}),
        ("HEAD", base, {}),
        ("GET", f"/jobs/{job_id}", {}),
    ]


def _assert_isolated(svc: LiveService, job_id: str) -> int:
    """Every route and page answers another project's job exactly as an unknown id."""
    unknown = "0123456789ab" if job_id != "0123456789ab" else "ba9876543210"
    checked = 0
    for method, path, kwargs in _cross_project_requests(job_id):
        theirs = svc.call(method, path, "beta", **kwargs)
        none = svc.call(method, path.replace(job_id, unknown), "beta", **kwargs)
        assert theirs.status_code == none.status_code == 404, (method, path, theirs.text)
        assert theirs.text.replace(job_id, unknown) == none.text, (method, path)
        assert "alpha" not in theirs.text
        checked += 1
    return checked


def test_another_projects_job_is_404_like_an_unknown_id(svc: LiveService) -> None:
    job = svc.submit("alpha")
    assert _assert_isolated(svc, job["id"]) >= 10
    after = svc.store.job("alpha", job["id"])
    assert after is not None and after.state == "queued" and not after.cancel_requested
    # the owner still reads it, and a malformed id is the same 404 too
    assert svc.call("GET", f"/api/v1/jobs/{job['id']}").status_code == 200
    assert _error(svc.call("GET", "/api/v1/jobs/..%2Fetc"), 404)["field"] in ("job", None)


def test_export_before_any_trial_is_a_409_and_bad_choices_400(svc: LiveService) -> None:
    job = svc.submit()
    base = f"/api/v1/jobs/{job['id']}/export"
    assert _error(svc.call("POST", base, json={"trial": "x"}), 400)["field"] == "trial"
    assert _error(svc.call("POST", base, json={"best": True, "trial": 1}), 400)["field"]
    assert _error(svc.call("POST", base, json={"format": "zip"}), 400)["field"] == "format"
    assert "no finished trial" in _error(svc.call("POST", base, json={}), 409)["error"]
    deep = svc.call("POST", base, data=b"[" * 100_000,
                    headers={"Content-Type": "application/json"})
    assert "not valid JSON" in _error(deep, 400)["error"]
    assert "POST" in _error(svc.call("GET", base), 409)["error"]


def _collect_events(svc: LiveService, job_id: str, out: list[tuple[str, Any]]) -> None:
    with svc.call("GET", f"/api/v1/jobs/{job_id}/events", stream=True,
                  timeout=(5, 60)) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event in parse_events(response.iter_lines(decode_unicode=True)):
            out.append(event)


def _drive_and_follow(svc: LiveService) -> list[tuple[str, Any]]:
    job = svc.submit()
    events: list[tuple[str, Any]] = []
    reader = threading.Thread(target=_collect_events, args=(svc, job["id"], events))
    reader.start()
    time.sleep(1.5)
    claimed = svc.store.claim("test-worker")
    assert claimed is not None and claimed.id == job["id"]
    time.sleep(1.5)
    svc.store.release("test-worker", job["id"], "done", seconds=3.0, trials=2)
    reader.join(timeout=30)
    assert not reader.is_alive(), "the event stream did not end with the job"
    return events


def _check_stream(events: list[tuple[str, Any]]) -> None:
    states = [data["state"] for name, data in events if name == "state"]
    assert states[0] == "queued" and "running" in states and states[-1] == "done"
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done"
    assert events[-1][1]["trials_done"] == 2


def test_events_stream_state_and_end_of_a_job_driven_through_the_store(
        svc: LiveService) -> None:
    _check_stream(_drive_and_follow(svc))


def test_postgresql_service_submits_isolates_and_streams(tmp_path: Path) -> None:
    with fresh_database() as url, live_service(url, tmp_path) as svc:
        job = svc.submit()
        assert [j["id"] for j in svc.call("GET", "/api/v1/jobs").json()["jobs"]] == [job["id"]]
        assert _error(svc.call("POST", "/api/v1/jobs", json={"budgets": ["-5ms"]}),
                      400)["field"] == "budgets"
        assert _assert_isolated(svc, job["id"]) >= 10
        svc.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
        assert svc.call("GET", f"/api/v1/jobs/{job['id']}").json()["job"]["state"] == \
            "cancelled"
        _check_stream(_drive_and_follow(svc))


def test_truncated_tar_gz_upload_is_a_400(svc: LiveService) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for i in range(20):
            data = bytes(range(256)) * 40 * (i + 1)
            info = tarfile.TarInfo(f"train/a/{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    cut = raw.getvalue()[: len(raw.getvalue()) // 2]
    response = svc.call("POST", "/api/v1/jobs", data={"spec": json.dumps({"trials": 2})},
                        files={"data": ("d.tar.gz", cut)})
    assert _error(response, 400)["field"] == "data"
    assert svc.store.jobs("alpha") == []


def test_a_study_read_that_fails_is_201_at_submit_and_503_after(svc: LiveService) -> None:
    studies = svc.server.server.app.config["SERVICE"].studies
    studies.retry_s = 0.3

    def gone(name: str) -> Any:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    studies._snapshot = gone
    response = svc.call("POST", "/api/v1/jobs", json={"trials": 2})
    assert response.status_code == 201, response.text
    assert [j.id for j in svc.store.jobs("alpha")] == [response.json()["job"]["id"]]
    read = svc.call("GET", f"/api/v1/jobs/{response.json()['job']['id']}")
    assert "unreachable" in _error(read, 503)["error"]


def test_a_revoked_token_ends_its_open_event_stream(svc: LiveService,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_events, "POLL_S", 0.02)
    monkeypatch.setattr(app_state, "_TOKEN_TTL_S", 0.0)
    job = svc.submit()
    token_id, secret = svc.store.create_token("alpha", "short-lived")
    events: list[tuple[str, Any]] = []
    with requests.get(f"{svc.url}/api/v1/jobs/{job['id']}/events", stream=True,
                      headers={"Authorization": f"Bearer {secret}"},
                      timeout=(5, 10)) as response:
        for event in parse_events(response.iter_lines(decode_unicode=True)):
            events.append(event)
            if event[0] == "state":
                svc.store.revoke_token(token_id)
    assert events[-1][0] == "error" and "revoked" in events[-1][1]["error"]
