"""Dashboard JSON endpoints, pages, downloads and safety rules, through Flask's test client
(and one real werkzeug server in a thread) on a study written with Optuna directly."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from dashboard_fixtures import (
    SECOND_STUDY,
    STUDY,
    WEIGHT_LAYERS,
    DashboardStudy,
    artifact_bytes,
    build_synthetic_study,
    expected_from_storage,
)

from autocompress.dashboard import create_app, make_server, serve
from autocompress.dashboard._analysis import is_feasible
from autocompress.dashboard._app import plotly_js_path
from autocompress.errors import StudyError
from autocompress.results.pareto import hypervolume_points as hypervolume_2d
from autocompress.results.pareto import nondominated as pareto_front


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> DashboardStudy:
    return build_synthetic_study(tmp_path_factory.mktemp("dash"))


@pytest.fixture(scope="module")
def client(source: DashboardStudy):
    return create_app(source.storage_url).test_client()


def _db_digest(source: DashboardStudy) -> str:
    return hashlib.sha256(Path(source.storage_url[len("sqlite:///") :]).read_bytes()).hexdigest()


# -- studies -----------------------------------------------------------------------------


def test_studies_list_names_model_budgets_and_counts(client) -> None:
    data = client.get("/api/studies").get_json()
    rows = {s["name"]: s for s in data["studies"]}
    assert set(rows) == {STUDY, SECOND_STUDY}
    demo = rows[STUDY]
    assert demo["model_spec"] == "demo" and demo["data_spec"] == "sklearn:digits"
    assert [b["text"] for b in demo["budgets"]] == ["5ms"]
    assert demo["counts"]["complete"] == 7
    assert demo["counts"]["infeasible"] == 2
    assert demo["counts"]["failed"] == 1
    assert demo["counts"]["running"] == 1
    # The fp32 reference (trial 0, 97.5%) is not a compression result: the best feasible
    # candidate is trial 2; trial 7 is the smallest feasible file.
    assert demo["best_accuracy"] == {"value": 0.972, "number": 2, "baseline": None}
    assert demo["smallest_size"]["number"] == 7
    assert demo["smallest_size"]["value"] == 40_000
    html = client.get("/").get_data(as_text=True)
    assert STUDY in html and SECOND_STUDY in html


def test_study_json_counts_front_and_progress(client) -> None:
    data = client.get(f"/api/study/{STUDY}").get_json()
    assert data["counts"] == {
        "total": 9,
        "complete": 7,
        "running": 1,
        "pruned": 0,
        "waiting": 0,
        "feasible": 5,
        "infeasible": 2,
        "failed": 1,
    }
    assert data["baselines"] == {"fp32": 0, "int8-ptq": 1}
    # Feasible front by size: 7 (40 kB, 94.0%), 2 (80 kB, 97.2%), 0 (400 kB, 97.5%).
    # Trial 3 (60 kB, 97.0%) would dominate 2 but is over the 5 ms budget.
    assert data["front_2d"] == [7, 2, 0]
    by_number = {t["number"]: t for t in data["trials"]}
    assert by_number[3]["feasible"] is False and not by_number[3]["on_front"]
    assert by_number[3]["warm_start"] == "uniform-int4" and by_number[2]["warm_start"] is None
    assert data["learning_rate_probe"]["chosen"] == 0.003
    assert by_number[4]["accuracy"] is None  # rejected: the floor value is never shown
    assert by_number[4]["reason"].startswith("over budget at pre-check")
    assert by_number[5]["state"] == "FAIL" and by_number[5]["feasible"] is None
    assert by_number[8]["state"] == "RUNNING"

    progress = data["progress"]
    assert progress["reference"]["size_bytes"] == pytest.approx(400_000 * 1.1)
    assert progress["trial_numbers"] == list(range(9))
    hv = progress["hypervolume"]
    assert all(b >= a for a, b in itertools.pairwise(hv))  # never decreases
    ref = 440_000.0
    # Candidates: feasible trials other than the fp32 reference (trials 1, 2, 6, 7).
    expected_final = hypervolume_2d(
        [(0.968, 110_000), (0.972, 80_000), (0.95, 90_000), (0.94, 40_000)], ref
    )
    assert hv[-1] == pytest.approx(expected_final)
    # By hand: sizes 40k (0.94) -> 80k (0.972) -> ref 440k; 90k and 110k are dominated.
    assert hv[-1] == pytest.approx(40_000 * 0.94 + 360_000 * 0.972)
    # the page draws the share of the reference box the server computed
    box = progress["reference"]["size_bytes"]
    assert progress["hypervolume_share"] == [v / box for v in hv]
    assert hv[0] == 0.0
    assert progress["best_feasible_accuracy"][:3] == [None, 0.968, 0.972]

    # Polling with the current signature gets a short "unchanged" answer.
    again = client.get(f"/api/study/{STUDY}?since={data['signature']}").get_json()
    assert again == {"signature": data["signature"], "unchanged": True}
    stale = client.get(f"/api/study/{STUDY}?since=old").get_json()
    assert stale["counts"]["total"] == 9


def test_hypervolume_and_front_rules() -> None:
    # Two points: (acc 0.5, size 10) and (acc 0.8, size 20) against ref size 40:
    # [10, 20] x 0.5 + [20, 40] x 0.8 = 5 + 16.
    assert hypervolume_2d([(0.5, 10.0), (0.8, 20.0)], 40.0) == pytest.approx(21.0)
    # A dominated point adds nothing; a point beyond the reference adds nothing.
    assert hypervolume_2d(
        [(0.5, 10.0), (0.8, 20.0), (0.4, 30.0), (0.9, 50.0)], 40.0
    ) == pytest.approx(21.0)
    assert pareto_front(
        {0: [0.9, 100], 1: [0.8, 50], 2: [0.7, 60], 3: [0.9, 100]}, [True, False]
    ) == [0, 1, 3]


def test_feasibility_fallbacks() -> None:
    assert is_feasible("COMPLETE", {"feasible": False, "constraints": '{"a": -1}'}, {}) is False
    assert is_feasible("COMPLETE", {"constraints": '{"5ms": 0.0, "4MB": -2}'}, {}) is True
    assert is_feasible("COMPLETE", {"constraints": '{"5ms": 0.1}'}, {}) is False
    assert is_feasible("COMPLETE", {}, {"5ms": 0.3}) is False  # Optuna's system attrs
    assert is_feasible("COMPLETE", {}, {}) is True  # no constraint: feasible, as in Optuna
    assert is_feasible("FAIL", {"feasible": True}, {}) is None


# -- one trial ---------------------------------------------------------------------------


def test_trial_json_plan_in_model_order_and_fp32_comparison(client) -> None:
    data = client.get(f"/api/trial/{STUDY}/2").get_json()
    layers = data["layers"]
    assert [row["name"] for row in layers] == WEIGHT_LAYERS  # bn1 is not a weight layer
    by_name = {row["name"]: row for row in layers}
    assert by_name["conv2"]["bits"] == 4 and by_name["conv1"]["bits"] == 8
    # The plan prunes group "conv2"; its member conv3 gets the same ratio.
    assert by_name["conv2"]["prune"] == 0.5 and by_name["conv3"]["prune"] == 0.5
    assert by_name["conv1"]["prune"] == 0.0
    comp = data["comparison"]
    assert comp["fp32_trial"] == 0
    assert comp["times_smaller"] == pytest.approx(400_000 / 80_000)
    assert comp["times_faster"] == pytest.approx(2.0 / 1.1)  # 1 / latency_vs_fp32
    assert comp["accuracy_change_points"] == pytest.approx(-0.3)
    assert [r["phase"] for r in data["timing"]] == [
        "build",
        "precheck",
        "finetune",
        "export",
        "measure",
    ]
    assert data["artifact"]["url"] == f"/api/artifact/{STUDY}/2"
    assert data["artifact"]["filename"] == "trial2.onnx"
    assert data["runtime"]["threads"] == 2
    assert data["reason"] is None


def test_trial_pages_show_reasons_for_every_state(client) -> None:
    rejected = client.get(f"/api/trial/{STUDY}/4").get_json()
    assert rejected["reason"]["kind"] == "rejected"
    assert "9.10 ms > 5ms" in rejected["reason"]["text"]
    assert rejected["artifact"] is None
    failed = client.get(f"/api/trial/{STUDY}/5").get_json()
    assert failed["reason"] == {
        "kind": "failed",
        "text": "TrainingError: loss became NaN at step 40; lower the learning rate",
    }
    for number in range(9):
        page = client.get(f"/study/{STUDY}/trial/{number}")
        assert page.status_code == 200, number
    assert "loss became NaN" in client.get(f"/study/{STUDY}/trial/5").get_data(as_text=True)


def test_report_download_holds_metrics_plan_runtime_and_comparison(client) -> None:
    response = client.get(f"/api/report/{STUDY}/7")
    assert response.status_code == 200
    assert "attachment" in response.headers["Content-Disposition"]
    report = json.loads(response.data)
    assert report["metrics"]["size_bytes"] == 40_000
    assert report["plan"]["bits"]["conv1"] == 4
    assert report["runtime"]["runtime"] == "onnxruntime"
    assert report["baseline_comparison"]["times_smaller"] == pytest.approx(10.0)
    assert report["baseline_comparison"]["fp32"]["number"] == 0
    assert report["artifact"]["sha256"]


# -- downloads ---------------------------------------------------------------------------


def test_artifact_download_is_byte_identical(client, source: DashboardStudy) -> None:
    expected = expected_from_storage(source)
    number = expected["artifact_trial"]
    response = client.get(f"/api/artifact/{STUDY}/{number}")
    assert response.status_code == 200
    assert "attachment" in response.headers["Content-Disposition"]
    stored = artifact_bytes(source, expected["artifact_id"])
    assert response.data == stored
    assert len(stored) == 1500


@pytest.mark.parametrize(
    "path",
    [
        f"/api/artifact/{STUDY}/3",  # complete, but no artifact recorded
        f"/api/artifact/{STUDY}/5",  # failed
        f"/api/artifact/{STUDY}/99",  # no such trial
        f"/api/artifact/{STUDY}/abc",  # not a trial number
        f"/api/artifact/{SECOND_STUDY}/0",  # that study's trials have no artifacts
        "/api/artifact/nope/0",  # no such study
        f"/api/artifact/{STUDY}/..%2F..%2Fdash.db",
    ],
)
def test_artifact_download_refuses_what_is_not_a_recorded_artifact(client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.get_json()["error"]


def test_artifact_id_attr_cannot_escape_the_artifact_folder(tmp_path: Path) -> None:
    """Even a database that records a path as artifact id serves nothing outside the store."""
    (tmp_path / "secret.txt").write_text("not for download")
    (tmp_path / "x-artifacts").mkdir()
    url = f"sqlite:///{tmp_path / 'x.db'}"
    study = optuna.create_study(study_name="evil", storage=url, directions=["maximize"])
    study.add_trial(
        optuna.trial.create_trial(values=[1.0], user_attrs={"artifact_id": "../secret.txt"})
    )
    response = create_app(url).test_client().get("/api/artifact/evil/0")
    assert response.status_code == 404
    assert b"not for download" not in response.data


# -- bad input ---------------------------------------------------------------------------


def test_unknown_study_404_lists_studies(client) -> None:
    page = client.get("/study/nope")
    assert page.status_code == 404
    text = page.get_data(as_text=True)
    assert "nope" in text
    assert f'href="/study/{STUDY}"' in text and f'href="/study/{SECOND_STUDY}"' in text
    api = client.get("/api/study/nope")
    assert api.status_code == 404
    assert sorted(api.get_json()["existing"]) == sorted([STUDY, SECOND_STUDY])


def test_unknown_trial_404_lists_trial_numbers(client) -> None:
    page = client.get(f"/study/{STUDY}/trial/99")
    assert page.status_code == 404
    text = page.get_data(as_text=True)
    assert "trials: 0-8" in text
    assert f'href="/study/{STUDY}/trial/4"' in text
    api = client.get(f"/api/trial/{STUDY}/x")
    assert api.status_code == 404
    assert api.get_json()["existing"] == [str(n) for n in range(9)]


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch", "options"])
def test_only_get_is_served(client, method: str) -> None:
    for path in ("/", f"/api/study/{STUDY}", f"/api/artifact/{STUDY}/2", "/api/nothing"):
        response = getattr(client, method)(path)
        assert response.status_code == 405, (method, path)
        assert response.headers["Allow"] == "GET, HEAD"


def test_storage_that_cannot_be_opened_is_a_one_line_study_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(StudyError, match="no study database") as info:
        serve(f"sqlite:///{missing}", port=0)
    assert "\n" not in str(info.value)
    assert not missing.exists()  # opening read-only never creates the file
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StudyError, match="cannot open study storage") as info:
        create_app(f"sqlite:///{junk}")
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StudyError, match="holds no Optuna study tables"):
        create_app(f"sqlite:///{empty}")
    assert sqlite3.connect(empty).execute("select count(*) from sqlite_master").fetchone() == (0,)


def test_storage_errors_never_show_the_password() -> None:
    with pytest.raises(StudyError) as info:  # port 1: refused at once
        serve("postgresql://user:hunter2pw@127.0.0.1:1/db", port=0)
    assert "hunter2pw" not in str(info.value)
    assert "user:***@127.0.0.1:1" in str(info.value)


def test_postgres_storage_is_read_only(source: DashboardStudy) -> None:
    url = os.environ.get("AUTOCOMPRESS_TEST_PG_URL")
    if not url:
        if os.environ.get("AUTOCOMPRESS_REQUIRE_SERVICES") == "1":
            pytest.fail("AUTOCOMPRESS_TEST_PG_URL is not set but services are required")
        pytest.skip("set AUTOCOMPRESS_TEST_PG_URL to test a PostgreSQL storage")
    name = f"dash-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    try:
        study.add_trial(
            optuna.trial.create_trial(
                values=[0.9, 1000.0],
                user_attrs={"accuracy": 0.9, "size_bytes": 1000, "feasible": True},
            )
        )
        app = create_app(url)
        data = app.test_client().get(f"/api/study/{name}").get_json()
        assert data["counts"]["complete"] == 1 and data["front_2d"] == [0]
        reader_storage = app.config["READER"].storage
        study_id = reader_storage.get_study_id_from_name(name)
        with pytest.raises(optuna.exceptions.StorageInternalError) as info:
            reader_storage.set_study_user_attr(study_id, "touched", True)
        cause = info.value.__cause__ or info.value.__context__
        assert "read-only" in str(cause)  # the server itself refuses the dashboard's writes
        assert "touched" not in optuna.load_study(study_name=name, storage=url).user_attrs
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_port_in_use_is_a_study_error_naming_the_port(source: DashboardStudy) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(StudyError, match=f"port {port}"):
            serve(source.storage_url, port=port)
    finally:
        holder.close()


# -- token -------------------------------------------------------------------------------


def test_token_required_on_every_request(source: DashboardStudy) -> None:
    c = create_app(source.storage_url, token="s3cret").test_client()
    for path in (
        "/",
        f"/study/{STUDY}",
        "/api/studies",
        f"/api/artifact/{STUDY}/2",
        "/vendor/plotly.min.js",
        "/static/app.js",
    ):
        assert c.get(path).status_code == 401, path
    assert c.get("/api/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/studies", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/studies", headers={"X-Autocompress-Token": "s3cret"}).status_code == 200

    browser = create_app(source.storage_url, token="s3cret").test_client()
    first = browser.get(f"/study/{STUDY}?token=s3cret")
    assert first.status_code == 303  # cookie set, token removed from the address bar
    assert first.headers["Location"].endswith(f"/study/{STUDY}")
    cookies = first.headers.getlist("Set-Cookie")
    assert len(cookies) == 1  # once (it was sent twice)
    assert "autocompress_token=" in cookies[0] and "HttpOnly" in cookies[0]
    assert browser.get(f"/study/{STUDY}").status_code == 200  # the cookie carries it now
    assert browser.get(f"/api/study/{STUDY}").status_code == 200


def test_token_never_reaches_the_access_log_or_the_startup_line(
    source: DashboardStudy, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    import autocompress.dashboard._server as server_mod

    server = make_server(source.storage_url, port=0, token="s3cret-tok")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            url = f"http://127.0.0.1:{server.server_port}/api/studies?x=1&token=s3cret-tok"
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "/api/studies?x=1&token=***" in logged and "s3cret-tok" not in logged

    class Once:  # serve() prints its startup lines, then serves until interrupted
        server_port = 8099

        def serve_forever(self) -> None:
            raise KeyboardInterrupt

        def server_close(self) -> None:
            pass

    monkeypatch.setattr(server_mod, "make_server", lambda *a, **k: Once())
    serve(source.storage_url, port=8099, token="s3cret-tok")
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8099/" in out and "s3cret-tok" not in out


def test_token_from_environment(source: DashboardStudy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_DASHBOARD_TOKEN", "envtok")
    c = create_app(source.storage_url).test_client()
    assert c.get("/api/studies").status_code == 401
    assert c.get("/api/studies", headers={"X-Autocompress-Token": "envtok"}).status_code == 200


def test_non_loopback_bind_needs_a_token(
    source: DashboardStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOCOMPRESS_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(StudyError, match="token"):
        serve(source.storage_url, host="0.0.0.0", port=0)
    server = make_server(source.storage_url, host="0.0.0.0", port=0, token="s3cret")
    server.server_close()
    loopback = make_server(source.storage_url, host="127.0.0.1", port=0)
    loopback.server_close()


# -- offline, read-only, torch-free -------------------------------------------------------


def test_pages_are_offline_and_serve_plotly_from_the_package(client) -> None:
    for path in ("/", f"/study/{STUDY}", f"/study/{STUDY}/trial/2", "/study/nope"):
        html = client.get(path).get_data(as_text=True)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), path
        assert "cdn" not in html.lower()
    assert '<script src="/vendor/plotly.min.js">' in client.get(f"/study/{STUDY}").get_data(
        as_text=True
    )
    bundle = client.get("/vendor/plotly.min.js")
    assert bundle.status_code == 200
    assert bundle.data == plotly_js_path().read_bytes()
    for asset in ("/static/app.js", "/static/style.css"):  # no remote fetches, fonts, images
        assert not re.search(rb"https?://|url\(\s*['\"]?//", client.get(asset).data), asset


def test_real_server_in_thread_serves_and_stays_read_only(source: DashboardStudy) -> None:
    before = _db_digest(source)
    server = make_server(source.storage_url, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/api/study/{STUDY}", timeout=10) as r:
            assert json.loads(r.read())["counts"]["complete"] == 7
        request = urllib.request.Request(f"{base}/api/studies", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405
        for path in ("/", f"/study/{STUDY}", f"/api/trial/{STUDY}/7", f"/api/report/{STUDY}/7"):
            with urllib.request.urlopen(base + path, timeout=10) as r:
                assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert _db_digest(source) == before


def test_dashboard_never_imports_torch(source: DashboardStudy) -> None:
    script = f"""
import sys
from autocompress.dashboard import create_app
c = create_app({source.storage_url!r}).test_client()
for path in ("/", "/study/{STUDY}", "/study/{STUDY}/trial/2", "/api/report/{STUDY}/2",
             "/api/artifact/{STUDY}/2"):
    assert c.get(path).status_code == 200, path
import json
ours = sorted(m for m in sys.modules if m.startswith("autocompress"))
print(json.dumps({{"torch": "torch" in sys.modules, "ours": ours}}))
"""
    out = (
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    result = json.loads(out)
    assert result["torch"] is False
    # Of the package, only the torch-free modules the dashboard shares with the search:
    # the options (layer 1: nothing but errors below it), the Optuna adapter (storage,
    # records, attribute names), fronts and hypervolume, the comparison metrics (torch only
    # inside the functions the dashboard never calls).
    allowed = {"autocompress", "autocompress.errors", "autocompress.config", "autocompress.study",
               "autocompress.results", "autocompress.results.pareto",
               "autocompress.results.metrics"}
    others = [
        m for m in result["ours"] if m not in allowed
        and not m.startswith(("autocompress.dashboard", "autocompress.study.",
                              "autocompress.config."))
    ]
    assert others == [], others
