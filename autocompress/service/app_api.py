"""The ``/api/v1`` JSON routes: submit, list, read, follow (server-sent events), cancel,
export and download, and a trial's artifact. Every job lookup is ``state.job(project, id)``:
another project's job is the same 404 as an unknown id."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request, send_file

from autocompress.dashboard._db import Missing
from autocompress.errors import InputError
from autocompress.service.app_events import event_stream
from autocompress.service.app_state import JobNotFound, ServiceState
from autocompress.service.app_submit import submit_job
from autocompress.service.openapi import openapi_document
from autocompress.service.store import Job

API = "/api/v1"
TERMINAL = ("done", "failed", "cancelled")


class ApiError(InputError):
    """A request the API refuses: a one-line message, the field at fault, an HTTP status."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def install_api(app: Flask, state: ServiceState) -> None:
    @app.errorhandler(JobNotFound)
    def _not_found(exc: JobNotFound) -> Any:
        return _not_found_answer(exc.message, "job")

    @app.errorhandler(Missing)
    def _missing(exc: Missing) -> Any:
        return _not_found_answer(exc.message, None)

    @app.get(f"{API}/openapi.json")
    def openapi() -> Any:
        return jsonify(openapi_document(request.host_url.rstrip("/")))

    @app.post(f"{API}/jobs")
    def submit() -> Any:
        job = submit_job(state, g.project)
        # no study read: the job is queued already, and a read error here would answer 5xx
        # to a client that then submits it again
        response = jsonify({"job": job_json(state, job, with_front=False)})
        response.status_code = 201
        response.headers["Location"] = f"{API}/jobs/{job.id}"
        return response

    @app.get(f"{API}/jobs")
    def jobs() -> Any:
        return jsonify({"project": g.project,
                        "jobs": [job_summary(j) for j in state.store.jobs(g.project)]})

    @app.get(f"{API}/jobs/<job_id>")
    def read(job_id: str) -> Any:
        return jsonify({"job": job_json(state, state.job(g.project, job_id))})

    @app.get(f"{API}/jobs/<job_id>/events")
    def events(job_id: str) -> Any:
        job = state.job(g.project, job_id)
        response = Response(event_stream(state, g.project, job, token=g.get("token")),
                            mimetype="text/event-stream")
        response.headers["X-Accel-Buffering"] = "no"  # a proxy must pass events at once
        return response

    @app.post(f"{API}/jobs/<job_id>/cancel")
    def cancel(job_id: str) -> Any:
        state.job(g.project, job_id)
        job = state.store.cancel(g.project, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return jsonify({"job": job_json(state, job, with_front=False)})

    _install_export_routes(app, state)

    @app.get(f"{API}/jobs/<job_id>/artifacts/<int:trial>/<name>")
    def artifact(job_id: str, trial: int, name: str) -> Any:
        job = state.job(g.project, job_id)
        handle, info = state.studies.open_artifact(job.study, trial, name)
        response = send_file(handle, mimetype=info["mimetype"], as_attachment=True,
                             download_name=f"job-{job.id}-trial{trial}-{name}")
        if info.get("sha256"):
            response.headers["X-Artifact-SHA256"] = str(info["sha256"])
        return response


def _install_export_routes(app: Flask, state: ServiceState) -> None:
    @app.post(f"{API}/jobs/<job_id>/export")
    def export(job_id: str) -> Any:
        job = state.job(g.project, job_id)
        trial = _export_choice(_json_body(allow_empty=True))
        if not state.studies.snapshot(job.study)["trials"]:
            raise ApiError(f"job {job.id} has no finished trial yet ({job.state}); export "
                           "once GET /api/v1/jobs/<id> shows trials", field=None, status=409)
        started = state.exports.request(job.id, job.study, trial=trial, spec=job.spec,
                                        ended=job.finished and not job.workers)
        response = jsonify({"export": started})
        response.status_code = 202
        return response

    @app.get(f"{API}/jobs/<job_id>/export")
    def download(job_id: str) -> Any:
        job = state.job(g.project, job_id)
        path = state.exports.zip_path(job.id)
        if path is None:
            now = state.exports.state(job.id)
            why = f": {now['reason']}" if now.get("reason") else ""
            raise ApiError(f"no export of job {job.id} is ready (export state {now['state']}"
                           f"{why}); POST /api/v1/jobs/{job.id}/export, then wait for "
                           "export.state 'done'", status=409)
        return send_file(path, mimetype="application/zip", as_attachment=True,
                         download_name=f"job-{job.id}-export.zip")


def _export_choice(body: dict[str, Any]) -> int | None:
    """{"best": true} (the default) or {"trial": N} -> the trial number or None for best."""
    unknown = sorted(set(body) - {"best", "trial"})
    if unknown:
        raise ApiError(f"unknown export option {unknown[0]!r}; send {{\"best\": true}} or "
                       "{\"trial\": N}", field=unknown[0])
    trial = body.get("trial")
    best = body.get("best")
    if best not in (None, True, False):
        raise ApiError("best must be true or false", field="best")
    if trial is None:
        if best is False:
            raise ApiError("with best false, name a trial: {\"trial\": N}", field="trial")
        return None
    if isinstance(trial, bool) or not isinstance(trial, int) or trial < 0:
        raise ApiError(f"trial must be a trial number (an integer >= 0), not {trial!r}",
                       field="trial")
    if best is True:
        raise ApiError("send either {\"best\": true} or {\"trial\": N}, not both",
                       field="trial")
    return trial


def _json_body(*, allow_empty: bool) -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw.strip() and allow_empty:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting
        raise ApiError(f"the request body is not valid JSON ({exc}); send a JSON object",
                       field=None) from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", field=None)
    return body


def job_summary(job: Job) -> dict[str, Any]:
    """A job as the list shows it: its row with progress, no study read."""
    data = job.to_json()
    spec = data.pop("spec", None) or {}
    data["model"] = _shown(spec.get("model"), "demo")
    data["data"] = _shown(spec.get("data"), "digits")
    data["progress"] = _progress(job)
    data["terminal"] = job.state in TERMINAL
    return data


def job_json(state: ServiceState, job: Job, *, with_front: bool = True) -> dict[str, Any]:
    """A job with its progress, its study's Pareto front and the state of its export."""
    data = job.to_json()
    data["progress"] = _progress(job)
    data["terminal"] = job.state in TERMINAL
    data["export"] = state.exports.state(job.id)
    if with_front:
        snapshot = state.studies.snapshot(job.study)
        data["front"] = snapshot["front"]
        data["trials"] = snapshot["counts"]
    return data


def _shown(value: Any, default: str) -> str:
    """A spec value for a table cell (an upload is stored as a dict: shown as its kind)."""
    if value is None:
        return default
    return value if isinstance(value, str) else "uploaded file"


def _progress(job: Job) -> dict[str, Any]:
    return {"trials_done": job.trials_done, "trials_target": job.trials_target,
            "seconds_used": round(float(job.seconds_used or 0.0), 1),
            "time_limit_s": job.time_limit_s}


def _not_found_answer(message: str, field: str | None) -> Any:
    if request.path.startswith("/api/"):
        return _json(message, 404, field)
    body = render_template("error.html", title="Not found", status=404, message=message)
    return Response(body, status=404, mimetype="text/html")


def _json(message: str, status: int, field: str | None) -> Response:
    response = jsonify({"error": message, "field": field})
    response.status_code = status
    return response


__all__ = ["API", "TERMINAL", "ApiError", "install_api", "job_json", "job_summary"]
