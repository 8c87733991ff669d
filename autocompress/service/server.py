"""``autocompress serve``: the service's app on a threaded HTTP server, with the port checked
first, tokens masked in the access log, and -- with a SQLite database, the embedded default --
one worker thread in the same process, so the service runs with no other component."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer
from werkzeug.serving import make_server as _werkzeug_server

from autocompress.dashboard._server import _check_port_free, _MaskingRequestHandler
from autocompress.errors import AutocompressError, InputError, StudyError, one_line
from autocompress.service.app import create_service_app
from autocompress.study.urls import masked_url, sqlite_path

# How long shutdown waits for an embedded worker to finish its trial before leaving it
# (a daemon thread: the process exit fails that trial, which the next start resumes).
_WORKER_JOIN_S = 30.0


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def default_embedded_workers(storage_url: str) -> int:
    """SQLite: one worker in-process (the embedded default); PostgreSQL: none (run
    ``autocompress worker`` processes)."""
    return 1 if sqlite_path(storage_url) is not None else 0


def _work_dir(storage_url: str, given: str | Path | None) -> Path | None:
    """Exports beside a SQLite database (kept across restarts); else a temporary folder."""
    if given is not None:
        return Path(given)
    path = sqlite_path(storage_url)
    return path.with_name(path.stem + "-exports") if path is not None else None


class ServiceServer:
    """The bound HTTP server and its embedded workers; ``serve_forever`` then ``close``."""

    def __init__(self, server: BaseWSGIServer, storage_url: str, artifacts: str,
                 workers: int) -> None:
        self.server = server
        self.storage_url = storage_url
        self.artifacts = artifacts
        self.stop_event = threading.Event()
        self._served = False
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                         name=f"embedded-worker-{i}") for i in range(workers)]

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def serve_forever(self) -> None:
        self._served = True
        self.server.serve_forever()

    def start_workers(self) -> None:
        for thread in self.threads:
            thread.start()

    def _worker(self, index: int) -> None:
        from autocompress.service.worker import new_worker_id, run_worker

        try:
            run_worker(self.storage_url, self.artifacts, worker_id=f"{new_worker_id()}-serve"
                       f"{index}", stop_event=self.stop_event, log=_say)
        except AutocompressError as exc:
            _say(f"embedded worker stopped: {one_line(exc, whole=True, limit=None)}")
        except Exception as exc:  # a bug: the server keeps answering; the log says why
            logging.getLogger("autocompress.service").error("embedded worker crashed",
                                                            exc_info=exc)

    def close(self) -> None:
        self.stop_event.set()
        if self._served:  # shutdown() waits for a serve_forever loop that must have run
            self.server.shutdown()
        self.server.server_close()
        deadline = time.monotonic() + _WORKER_JOIN_S
        for thread in self.threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        state = self.server.app.config.get("SERVICE")  # type: ignore[attr-defined]
        if state is not None:
            state.exports.close()


def make_service_server(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: str,
    allow_code_upload: bool = False,
    embedded_workers: int | None = None,
    upload_limits: Any = None,
    work_dir: str | Path | None = None,
) -> ServiceServer:
    """Bind the server (workers not started yet). Every setup problem is a one-line
    StudyError/InputError raised here, before anything is served."""
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port {port} is not a TCP port; use a number from 1 to 65535")
    workers = default_embedded_workers(storage_url) if embedded_workers is None \
        else int(embedded_workers)
    if workers < 0:
        raise InputError(f"--embedded-workers {workers} must be 0 or more")
    if workers > 1 and sqlite_path(storage_url) is not None:
        raise InputError("SQLite serves one worker: pass --embedded-workers 0 or 1, or use "
                         "PostgreSQL (--storage postgresql://user:pw@host/db) for several")
    app = create_service_app(storage_url, artifacts=artifacts,
                             allow_code_upload=allow_code_upload, upload_limits=upload_limits,
                             work_dir=_work_dir(storage_url, work_dir))
    _check_port_free(host, port)
    try:
        server = _werkzeug_server(host, port, app, threaded=True,
                                  request_handler=_MaskingRequestHandler)
    except OSError as exc:
        raise StudyError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pick "
                         "another --port or --host") from None
    return ServiceServer(server, storage_url, str(artifacts), workers)


def serve_service(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: str,
    allow_code_upload: bool = False,
    embedded_workers: int | None = None,
    upload_limits: Any = None,
) -> None:
    """Serve until interrupted (SIGTERM/Ctrl-C): embedded workers stop after their trial."""
    service = make_service_server(storage_url, host=host, port=port, artifacts=artifacts,
                                  allow_code_upload=allow_code_upload,
                                  embedded_workers=embedded_workers,
                                  upload_limits=upload_limits)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{service.port}/"
    print(f"autocompress service: {url} (API {url}api/v1, OpenAPI {url}api/v1/openapi.json)",
          flush=True)
    print(f"jobs in {masked_url(storage_url)}, artifacts in {artifacts}; "
          f"{len(service.threads) or 'no'} embedded worker(s)"
          + ("" if service.threads else ": start `autocompress worker` processes"), flush=True)
    print("a project token: autocompress admin project create NAME && autocompress admin "
          "token create NAME (same --storage); then export AUTOCOMPRESS_TOKEN=<token> and "
          f"AUTOCOMPRESS_SERVER={url.rstrip('/')}; press Ctrl+C to stop", flush=True)
    service.start_workers()
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        _say("stopping: embedded workers end after their current trial")
    finally:
        service.close()


__all__ = ["ServiceServer", "default_embedded_workers", "make_service_server", "serve_service"]
