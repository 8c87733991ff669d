"""A real service for tests: the app on a werkzeug server bound to a free port (in a thread),
over a real SQLite file or PostgreSQL database, with two projects and a token each."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from autocompress.service.server import ServiceServer, make_service_server
from autocompress.service.store import JobStore


@dataclass
class LiveService:
    url: str
    storage_url: str
    artifacts: Path
    store: JobStore
    tokens: dict[str, str]  # project -> secret
    server: ServiceServer

    def call(self, method: str, path: str, project: str | None = "alpha",
             **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if project is not None:
            headers["Authorization"] = f"Bearer {self.tokens[project]}"
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        return requests.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def submit(self, project: str = "alpha", **spec: Any) -> dict[str, Any]:
        body = {"trials": 2, "finetune_steps": 10, "latency_repeats": 3, **spec}
        response = self.call("POST", "/api/v1/jobs", project, json=body)
        assert response.status_code == 201, response.text
        return response.json()["job"]


@contextlib.contextmanager
def live_service(storage_url: str, folder: Path, *, embedded_workers: int = 0,
                 projects: tuple[str, ...] = ("alpha", "beta"),
                 upload_limits: Any = None,
                 artifacts: str | None = None) -> Iterator[LiveService]:
    """A started server (and its embedded workers when asked), stopped at the end."""
    store = JobStore(storage_url)
    tokens = {}
    for name in projects:
        store.create_project(name)
        tokens[name] = store.create_token(name, "test")[1]
    location = artifacts or str(folder / "artifacts")  # a folder, or s3://bucket/prefix
    service = make_service_server(storage_url, port=0, artifacts=location,
                                  embedded_workers=embedded_workers, work_dir=folder / "work",
                                  upload_limits=upload_limits)
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    service.start_workers()
    try:
        yield LiveService(f"http://127.0.0.1:{service.port}", storage_url, Path(location), store,
                          tokens, service)
    finally:
        service.close()
        thread.join(timeout=10)
        store.close()
