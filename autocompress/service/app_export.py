"""Exports requested over HTTP: ``export_from_storage`` (the ``export`` command's code path,
verified) run in one background thread, one job's export at a time, into a folder per job
under the server's work folder, then zipped for download. The state of each job's export
(none / running / done / failed with its reason) is what ``GET /api/v1/jobs/<id>`` shows."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autocompress.errors import AutocompressError, one_line

_LOG = logging.getLogger("autocompress.service")


class Exports:
    """Per-job export state and files. Job ids are checked by the caller (store lookup)."""

    def __init__(self, storage_url: str, artifacts: str, folder: Path) -> None:
        self.storage_url = storage_url
        self.artifacts = artifacts
        self.folder = folder
        self._states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # One export at a time: each re-measures a model and would slow the others and the
        # embedded worker's trials.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")

    def state(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            known = self._states.get(job_id)
            if known is not None:
                return dict(known)
        if (self.folder / job_id / "export.zip").is_file():  # done before a restart
            return {"state": "done", "trial": None, "reason": None}
        return {"state": "none", "trial": None, "reason": None}

    def request(self, job_id: str, study: str, *, trial: int | None,
                spec: dict[str, Any] | None = None, ended: bool = False) -> dict[str, Any]:
        """Start an export (``trial`` None: the best within the study's budgets); while one
        runs for this job, a second request returns its state. ``spec``: the job's, whose
        uploads the export reloads; ``ended``: no worker needs them here any more."""
        with self._lock:
            current = self._states.get(job_id)
            if current is not None and current["state"] == "running":
                return dict(current)
            state = {"state": "running", "trial": trial, "best": trial is None,
                     "reason": None, "requested_at": time.time(), "finished_at": None}
            self._states[job_id] = state
        self._pool.submit(self._run, job_id, study, trial, dict(spec or {}), ended)
        return dict(state)

    def zip_path(self, job_id: str) -> Path | None:
        path = self.folder / job_id / "export.zip"
        return path if self.state(job_id)["state"] == "done" and path.is_file() else None

    def _run(self, job_id: str, study: str, trial: int | None, spec: dict[str, Any],
             ended: bool) -> None:
        from autocompress.export import export_from_storage  # torch: only when exporting
        from autocompress.service import uploads

        root = self.folder / job_id
        try:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            # the study recorded the uploads' fixed per-job paths: put them there again
            uploads.materialize_job(self.artifacts, job_id, spec)
            try:
                result = export_from_storage(self.storage_url, study, out=root / "files",
                                             trial=trial, best=trial is None, verify=True)
            finally:
                if ended:
                    uploads.remove_job_files(job_id)
            _zip_folder(root / "files", root / "export.zip")
            self._finish(job_id, "done", None, result.trial)
        except AutocompressError as exc:
            self._finish(job_id, "failed", one_line(exc, whole=True, limit=500), trial)
        except Exception as exc:  # a bug: logged whole, shown as one line
            _LOG.error("export of job %s failed", job_id, exc_info=exc)
            self._finish(job_id, "failed", f"internal error: {one_line(exc, typed=True)}",
                         trial)

    def _finish(self, job_id: str, state: str, reason: str | None, trial: int | None) -> None:
        with self._lock:
            entry = self._states.setdefault(job_id, {})
            entry.update(state=state, reason=reason, trial=trial, finished_at=time.time())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _zip_folder(folder: Path, dest: Path) -> None:
    """Every file under ``folder`` by its relative path (written beside, then renamed, so a
    download never sees half a zip)."""
    partial = dest.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    partial.replace(dest)


__all__ = ["Exports"]
