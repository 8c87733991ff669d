"""Reading a job's study (``job-<id>``, in the service's database) for the API and pages:
its finished trials, its Pareto front (the rule ``show`` and export use), and a trial's
recorded artifact. Read-only; the storage is opened once and shared by every request."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import optuna

from autocompress.dashboard._db import Missing, open_storage, retry
from autocompress.errors import StudyError
from autocompress.results.pareto import pareto_front
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord, records, study_info
from autocompress.study.resilient import MAX_BACKOFF_S, cause_line, is_connection_error
from autocompress.study.storage import is_transient, worker_settings
from autocompress.study.urls import driver_url

_T = TypeVar("_T")
_SAFE_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_FINISHED = ("COMPLETE", "FAIL", "PRUNED")
# A job's snapshot is reused this long: 50 clients polling a running job once a second each
# rebuilt its Pareto front from the study (p50 419 ms, p99 3.6 s on 2 loaded cores); a
# trial takes seconds at least, so a second's staleness hides nothing.
SNAPSHOT_TTL_S = 1.0
# The names a trial's artifacts are served under -> (id attribute, sha256 attribute, file).
ARTIFACTS = {
    "model.onnx": (trial_attrs.ARTIFACT_ID, trial_attrs.ARTIFACT_SHA256,
                   "application/octet-stream"),
    "state_dict.pt": (trial_attrs.TORCH_ARTIFACT_ID, trial_attrs.TORCH_ARTIFACT_SHA256,
                      "application/octet-stream"),
}


class JobStudies:
    """The job studies of one service database, read through one cached storage."""

    def __init__(self, storage_url: str, artifacts: str) -> None:
        self.storage_url = storage_url
        self.artifacts = artifacts
        self._storage: optuna.storages.BaseStorage | None = None
        self._lock = threading.Lock()
        self._snapshots: dict[str, tuple[float, dict[str, Any]]] = {}
        self._snapshot_locks: dict[str, threading.Lock] = {}
        # how long a read rides out the database being gone (the store's setting)
        self.retry_s = worker_settings().db_retry_s

    def _opened(self) -> optuna.storages.BaseStorage:
        with self._lock:
            if self._storage is None:
                # Optuna's tables may not exist before the first job ran: create them (the
                # service owns this database), then read through the read-only storage.
                optuna.storages.RDBStorage(driver_url(self.storage_url)).engine.dispose()
                self._storage = open_storage(self.storage_url)
            return self._storage

    def _study(self, name: str) -> optuna.Study | None:
        try:
            return optuna.load_study(study_name=name, storage=self._opened())
        except KeyError:
            return None  # queued: the worker creates the study when it starts the job

    def snapshot(self, name: str) -> dict[str, Any]:
        """{"trials": finished trials, "front": the Pareto front, "counts"} (empty before
        the job's study exists); at most SNAPSHOT_TTL_S old."""
        with self._lock:
            lock = self._snapshot_locks.setdefault(name, threading.Lock())
        with lock:  # one reader rebuilds a job's snapshot, the others wait and reuse it
            cached = self._snapshots.get(name)
            if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_TTL_S:
                return cached[1]
            snapshot = self._read(f"job study {name}", lambda: self._snapshot(name))
            self._snapshots[name] = (time.monotonic(), snapshot)
            return snapshot

    def _snapshot(self, name: str) -> dict[str, Any]:
        study = self._study(name)
        if study is None:
            return {"trials": [], "front": [], "counts": _counts([])}
        rows = records(study)
        identity = study_info(study, self.storage_url).identity
        objectives = tuple(identity.get("objectives") or ("accuracy", "size"))
        front = pareto_front(rows, objectives)
        on_front = {r.number for r in front}
        finished = [trial_row(r, r.number in on_front) for r in rows if r.state in _FINISHED]
        return {"trials": finished, "front": [trial_row(r, True) for r in front],
                "counts": _counts(rows)}

    def open_artifact(self, name: str, number: int, filename: str
                      ) -> tuple[IO[bytes], dict[str, Any]]:
        """A trial's artifact by the id its trial recorded (never a name from the request).
        Missing for an unknown trial or file."""
        kind = ARTIFACTS.get(filename)
        study = self._read(f"job study {name}", lambda: self._study(name))
        trial = None if study is None or kind is None else next(
            (t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is None or kind is None:
            raise Missing(f"trial {number} has no artifact {filename!r}; artifacts: "
                          f"{', '.join(ARTIFACTS)}", [])
        artifact_id = trial.user_attrs.get(kind[0])
        if not isinstance(artifact_id, str) or not _SAFE_ARTIFACT_ID.match(artifact_id):
            raise Missing(f"trial {number} has no artifact {filename!r} recorded", [])
        location = self._location(study)
        try:
            from autocompress.study import artifact_store

            handle = artifact_store(location).open_reader(artifact_id)
        except Exception:  # not found, or the store unreachable: the user needs one line
            raise Missing(f"artifact {filename!r} of trial {number} is missing from the "
                          "artifact store; ask the operator to check --artifacts", []) from None
        return handle, {"mimetype": kind[2], "sha256": trial.user_attrs.get(kind[1])}

    def _read(self, what: str, call: Callable[[], _T]) -> _T:
        """``call`` retried with back-off while the database is briefly gone, as the store's
        transactions are; past ``retry_s`` a one-line StudyError (the API answers 503)."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                return retry(call)
            except Missing:
                raise
            except Exception as exc:
                if not (is_connection_error(exc) or is_transient(exc)):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StudyError(f"cannot read {what}: the service database is unreachable "
                                     f"({cause_line(exc)}) after {self.retry_s:g} s of retries; "
                                     "try again once it is back") from None
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)

    def _location(self, study: optuna.Study) -> str:
        """Where the job's worker stored artifacts: recorded on the study by the worker
        (from the service's settings, never from a request), else the service's own."""
        recorded = study.user_attrs.get("artifacts_dir")
        return recorded if isinstance(recorded, str) and recorded else self.artifacts


def trial_row(r: TrialRecord, on_front: bool) -> dict[str, Any]:
    """One trial as the API shows it: sizes in bytes, latency in ms, accuracy 0..1."""
    return {
        "number": r.number,
        "state": r.state,
        "accuracy": r.accuracy,
        "size_bytes": r.size_bytes,
        "latency_ms": r.latency_ms,
        "feasible": r.feasible,
        "baseline": r.baseline,
        "on_front": on_front,
        "plan_summary": r.plan_summary or None,
        "reason": r.rejected or r.fail_reason,
        "artifacts": [name for name, kind in ARTIFACTS.items() if r.attrs.get(kind[0])],
    }


def _counts(records: list[TrialRecord]) -> dict[str, int]:
    states = [r.state for r in records]
    return {"total": len(states), "complete": states.count("COMPLETE"),
            "failed": states.count("FAIL"), "pruned": states.count("PRUNED"),
            "running": states.count("RUNNING")}


__all__ = ["ARTIFACTS", "JobStudies", "Missing", "trial_row"]
