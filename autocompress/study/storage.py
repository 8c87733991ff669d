"""Study storage: worker settings, opening a storage (retried, with heartbeats), the retry
of a dead worker's trial, and the SQLite one-worker lock. URLs are in ``urls``, the
outage-proof connection in ``resilient``."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from autocompress.errors import StudyError, one_line
from autocompress.study import attrs as trial_attrs
from autocompress.study.resilient import (
    DB_RETRY_S,
    MAX_BACKOFF_S,
    ResilientStorage,
    is_connection_error,
)
from autocompress.study.urls import driver_url, masked_url, require_url, sqlite_path

log = logging.getLogger("autocompress")

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
ENV_HEARTBEAT_INTERVAL = "AUTOCOMPRESS_HEARTBEAT_INTERVAL"
ENV_GRACE_PERIOD = "AUTOCOMPRESS_GRACE_PERIOD"
ENV_DB_RETRY = "AUTOCOMPRESS_DB_RETRY_SECONDS"


optuna.logging.set_verbosity(optuna.logging.WARNING)


class _NoInterruptTraceback(logging.Filter):
    """Ctrl-C or SIGTERM ends a worker on purpose: Optuna's "trial failed" warning stays, its
    KeyboardInterrupt traceback (a screenful pointing into torch) goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is KeyboardInterrupt:
            record.exc_info = None
            record.exc_text = None
        return True


# The logger Optuna's optimize loop reports failed trials on.
logging.getLogger("optuna.study._optimize").addFilter(_NoInterruptTraceback())


@dataclass(frozen=True)
class WorkerSettings:
    """Fault-tolerance timings, from the environment (tests shorten them)."""

    heartbeat_interval_s: int
    grace_period_s: int
    db_retry_s: float


def _env_seconds(name: str, default: float, *, whole: bool) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = -1
    if not value > 0:  # also refuses nan
        kind = "whole number" if whole else "number"
        raise StudyError(f"{name}={text!r} must be a positive {kind} of seconds "
                         f"(e.g. {name}={default:g}); unset it for the default")
    return value


def worker_settings() -> WorkerSettings:
    interval = int(_env_seconds(ENV_HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL_S, whole=True))
    grace = int(_env_seconds(ENV_GRACE_PERIOD, GRACE_PERIOD_S, whole=True))
    if grace <= interval:
        # A grace period within one beat would fail trials whose worker is alive and well.
        raise StudyError(f"{ENV_GRACE_PERIOD}={grace} must exceed {ENV_HEARTBEAT_INTERVAL}="
                         f"{interval} (defaults: {GRACE_PERIOD_S} s and {HEARTBEAT_INTERVAL_S} s)")
    return WorkerSettings(interval, grace, _env_seconds(ENV_DB_RETRY, DB_RETRY_S, whole=False))


class _RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial (same parameters, system attribute
    ``failed_trial``), minus what the dead attempt half-recorded: the retry keeps the tags
    that say what the trial is (baseline, warm start, guided plan, a retrain's parent and
    step count) and no measurement or artifact metadata, so every figure it shows is its own."""

    _KEEP_USER_ATTRS = (trial_attrs.BASELINE, trial_attrs.WARM_START, trial_attrs.GUIDED,
                        trial_attrs.PARENT, trial_attrs.FINETUNE_STEPS,
                        trial_attrs.PROMOTION_RUNG, trial_attrs.REFINE_EPOCHS)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        history = trial.system_attrs.get("retry_history", [])
        again = self._max_retry is None or len(history) < self._max_retry
        log.warning("trial %d stopped sending heartbeats (its worker died or lost the "
                    "database): marked FAIL%s", trial.number,
                    ", queued again with the same parameters" if again else
                    f", not retried again (retried {len(history)} times)")
        clean = copy.copy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items()
                            if k in self._KEEP_USER_ATTRS}
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items()
                              if not k.startswith("artifacts:")}
        super().__call__(study, clean)


def open_storage(url: str, *, heartbeat: bool = True, create: bool = True) -> BaseStorage:
    """An RDB storage that retries lost connections; with ``heartbeat`` (searches), a killed
    worker's trial is failed after the grace period and run once more by another worker.

    Creating the schema is retried too: workers starting at once race on ``CREATE TABLE``
    (Optuna #4621), and a server that is still starting refuses connections for a moment.
    """
    path = sqlite_path(require_url(url))
    if path is not None:
        if not create and not path.is_file():
            raise StudyError(
                f"storage {url!r} does not exist; run `autocompress search` first "
                "or pass the --storage a search wrote to"
            )
        if not create or path.is_file():  # never write a schema into another's database
            _refuse_non_study_file(path, url, create=create)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot create the folder of storage {url!r} ({one_line(exc)}); "
                             "pass a --storage path in a folder you can write to") from None
    settings = worker_settings()
    kwargs: dict[str, Any] = {}
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if path is None:
        engine["connect_args"] = {"connect_timeout": 10}
    last: Exception | None = None
    deadline = time.monotonic() + settings.db_retry_s
    delay = 0.25
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                if heartbeat:
                    kwargs = {
                        "heartbeat_interval": settings.heartbeat_interval_s,
                        "grace_period": settings.grace_period_s,
                        "heartbeat_stale_trial_callback": _RetryStaleTrial(max_retry=1),
                    }
                backend = RDBStorage(driver_url(url), engine_kwargs=engine, **kwargs)
            return ResilientStorage(backend, settings.db_retry_s)
        except Exception as exc:
            last = exc
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
    raise StudyError(f"cannot open storage {masked_url(url)!r}: {one_line(last)}; check the "
                     "URL (e.g. sqlite:///studies/demo.db or postgresql://user:pw@host/db) and "
                     "that the database server is running")


def _refuse_non_study_file(path: Path, url: str, *, create: bool = False) -> None:
    """A file a reader is pointed at must be a SQLite database holding Optuna's tables;
    opening anything else through Optuna would write a fresh schema into it. A search
    (``create``) may also start in an empty file or an empty SQLite database, never in
    another program's."""
    if create and path.stat().st_size == 0:
        return
    try:
        tables = _sqlite_tables(path)
    except (OSError, sqlite3.Error) as exc:
        raise StudyError(f"cannot read storage {url!r} ({one_line(exc)}); check the path and "
                         "its permissions") from None
    if tables is not None and (_OPTUNA_TABLES <= tables or (create and not tables)):
        return
    if not create:
        raise StudyError(f"storage {url!r} is not a study database (no Optuna tables in it); "
                         "pass the --storage a search wrote to")
    held = f"another program's SQLite database (tables: {', '.join(sorted(tables)[:4])})" \
        if tables else "a file that is no SQLite database"
    raise StudyError(f"storage {url!r} is {held}; a study is never written into it: pass "
                     "--storage a new or empty file, e.g. "
                     f"sqlite:///{path.with_name(path.stem + '-study.db')}")


# Optuna's own tables: a file holding them is a study database (their schema, not a guess
# from one common name such as "studies").
_OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})


def _sqlite_tables(path: Path) -> set[str] | None:
    """The tables of the SQLite file at ``path``, read-only; None when it is no SQLite file."""
    with path.open("rb") as handle:
        if handle.read(16) != b"SQLite format 3\x00":
            return None
    connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    finally:
        connection.close()
    return {str(name) for (name,) in rows}


# Connection errors that waiting will not fix: a wrong password, user, host or database name.
_FATAL_RE = re.compile(r"authentication failed|no password supplied|could not translate host"
                       r"|invalid dsn|(database|role) \"[^\"]*\" does not exist")


def is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    if _FATAL_RE.search(text):
        return False
    if is_connection_error(exc):
        return True
    return any(
        word in text
        for word in ("unique", "already exists", "duplicate", "operational", "could not connect",
                     "connection", "locked", "timeout")
    )


@contextlib.contextmanager
def single_sqlite_worker(url: str) -> Iterator[None]:
    """SQLite cannot serve several writers ("database is locked"): hold an exclusive lock
    file for the search's lifetime and refuse a second worker with a clear message."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    existed = lock_path.exists()
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"another autocompress search is already writing to {path}; SQLite supports one "
                "worker at a time: wait for it, or use PostgreSQL "
                "(--storage postgresql://user:pw@host/db) to run several workers"
            ) from None
        handle.seek(0)
        previous = handle.read()
        _write_lock(handle, str(os.getpid()))
        try:
            yield
        except BaseException:
            # A refused run (a resume with other settings, a trial that cannot be refined)
            # leaves the folder as it found it: no new lock file, the old one's content.
            if existed:
                _write_lock(handle, previous)
            else:
                lock_path.unlink(missing_ok=True)
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_lock(handle: IO[str], text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def study_names(storage: BaseStorage) -> list[str]:
    """The names of the studies in a storage."""
    return [s.study_name for s in optuna.get_all_study_summaries(storage,
                                                                 include_best_trial=False)]
