"""The service's pages for the caller's project: its jobs, the submit form and one job's
page (state, progress, Pareto front, export). Pages render from the same data the API
returns; their script (static/service.js) refreshes them through the API."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from flask import Flask, g, redirect, render_template, request

from autocompress.service.app_api import job_json, job_summary
from autocompress.service.app_state import ServiceState

# Search targets the form offers (the search refuses the ones this server cannot time).
TARGETS = ("onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "tensorrt",
           "executorch-xnnpack")


def install_pages(app: Flask, state: ServiceState) -> None:
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["size"] = _size

    @app.get("/")
    def home() -> Any:
        return redirect("/jobs", code=303)

    @app.get("/login")
    def login() -> Any:
        target = request.args.get("next", "/jobs")
        if not target.startswith("/") or target.startswith("//"):
            target = "/jobs"  # never an open redirect
        return render_template("login.html", title="Token required", next=target)

    @app.get("/jobs")
    def jobs_page() -> Any:
        rows = [job_summary(j) for j in state.store.jobs(g.project)]
        return render_template("jobs.html", title="Jobs", project=g.project, jobs=rows)

    @app.get("/jobs/new")
    def new_job_page() -> Any:
        return render_template("new.html", title="Submit a job", project=g.project,
                               datasets=state.store.dataset_names(g.project),
                               targets=TARGETS, allow_code=state.allow_code_upload)

    @app.get("/jobs/<job_id>")
    def job_page(job_id: str) -> Any:
        data = job_json(state, state.job(g.project, job_id))
        return render_template("job.html", title=f"Job {data['id']}", project=g.project,
                               job=data)


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return _dt.datetime.fromtimestamp(float(epoch)).strftime("%Y-%m-%d %H:%M:%S")


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


__all__ = ["TARGETS", "install_pages"]
