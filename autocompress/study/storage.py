"""Study storage: URLs, worker settings, a connection that survives outages, the SQLite lock."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import logging
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

# Optuna's caching layer: every Study wraps an RDBStorage in it. Ours wraps it in turn, so it
# is built here (the one place that names a private Optuna module; Optuna 5.0).
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from autocompress.errors import StudyError, one_line
from autocompress.study import attrs as trial_attrs

log = logging.getLogger("autocompress")


HEARTBEAT_INTERVAL_S = 10


GRACE_PERIOD_S = 30


DB_RETRY_S = 30.0


ENV_HEARTBEAT_INTERVAL = "AUTOCOMPRESS_HEARTBEAT_INTERVAL"


ENV_GRACE_PERIOD = "AUTOCOMPRESS_GRACE_PERIOD"


ENV_DB_RETRY = "AUTOCOMPRESS_DB_RETRY_SECONDS"


_MAX_BACKOFF_S = 8.0


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


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for other backends."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


# The PostgreSQL drivers SQLAlchemy can use, in the order we prefer them. A bare
# ``postgresql://`` means psycopg2 in SQLAlchemy 2.0 and psycopg 3 in 2.1; the ``postgres``
# extra installs psycopg 3, so the URL names the driver that is installed, whichever
# SQLAlchemy is.
_PG_DRIVERS: tuple[tuple[str, str], ...] = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))


def driver_url(url: str) -> str:
    """``url`` with an explicit, installed PostgreSQL driver (other URLs unchanged).

    ``postgresql://`` / ``postgres://`` become ``postgresql+psycopg://`` (or ``+psycopg2``
    when only that is installed); a URL naming its driver is left as written. Raises a
    one-line StudyError when no driver is installed.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in _PG_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://{rest}"
    raise StudyError(
        "no PostgreSQL driver is installed for storage "
        f"{masked_url(url)!r}; install it with: pip install 'autocompress[postgres]'"
    )


def masked_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing to hide reliably
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the database could not be reached.

    Optuna wraps driver errors in ``StorageInternalError``, so the whole chain is examined.
    SQLite's OperationalError also covers "no such table"; only its lock errors are transient.
    """
    for err in _exception_chain(exc):
        if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
            return True
        if isinstance(err, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            orig = getattr(err, "orig", None)
            if type(orig).__module__.startswith("sqlite3"):
                return "locked" in str(orig) or "busy" in str(orig)
            return True
    return False


# Every storage call a Study makes, delegated with retries (BaseStorage's and BaseHeartbeat's
# public interface; ``_get_stale_trial_ids`` is the heartbeat interface's own name).
_RETRIED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "set_trial_param", "get_trial_param", "get_trial_params",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial", "get_all_trials", "get_n_trials",
    "get_best_trial", "_get_stale_trial_ids",
)


def _retrying(name: str) -> Callable[..., Any]:
    def call(self: _ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: getattr(self.cached, name)(*args, **kwargs))

    call.__name__ = name
    call.__doc__ = f"``{name}`` of the cached RDB storage, retried through an outage."
    return call


class _ResilientStorage(BaseStorage, BaseHeartbeat):
    """An RDB storage that rides out a database outage, by composition: it holds Optuna's
    ``RDBStorage`` (``backend``) behind Optuna's own caching layer (``cached``, what every
    Study builds around an ``RDBStorage``) and delegates each call to it with retries; no
    Optuna method is patched or overridden.

    Every call retries connection errors with exponential back-off (0.25 s doubling to 8 s) for
    up to ``retry_s`` seconds in all. Past that the storage is *lost*: the call raises
    ``StudyError`` and every later call fails at once, so the worker stops promptly instead of
    waiting once more per clean-up step. Each call is one transaction, so a retried call never
    half-applies; what was committed before the outage stays, and a rerun resumes from it.
    Heartbeats never retry (the next beat is the retry) and never give up.
    """

    def __init__(self, backend: RDBStorage, retry_s: float = DB_RETRY_S) -> None:
        self.backend = backend
        self.cached = _CachedStorage(backend)
        self.retry_s = retry_s
        self.lost: StudyError | None = None

    @property
    def url(self) -> str:
        return str(self.backend.url)

    @property
    def engine(self) -> Any:
        return self.backend.engine

    def _retry(self, call: Callable[[], Any]) -> Any:
        if self.lost is not None:
            raise StudyError(str(self.lost))
        started: float | None = None
        delay = 0.25
        while True:
            try:
                result = call()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning("lost the connection to the study database (%s); retrying for "
                                "up to %.0f s", _cause_line(exc), self.retry_s)
                waited = now - started
                if waited >= self.retry_s:
                    self.lost = StudyError(
                        f"lost the connection to the study database {masked_url(self.url)} "
                        f"({_cause_line(exc)}) after {waited:.0f} s; the study is consistent: "
                        "rerun the same command to resume"
                    )
                    raise StudyError(str(self.lost)) from None
                self.backend.scoped_session.remove()  # drop this thread's broken session
                time.sleep(min(delay, self.retry_s - waited))
                delay = min(2 * delay, _MAX_BACKOFF_S)
            else:
                if started is not None:
                    log.warning("reconnected to the study database after %.1f s",
                                time.monotonic() - started)
                return result

    # The retried delegates, one per call a Study makes (the class body's namespace is where
    # the abstract methods must be defined).
    for _name in _RETRIED_CALLS:
        locals()[_name] = _retrying(_name)
    del _name

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        attempts = 0

        def write() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return self.cached.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                # The attempt cut off by the outage may have committed before the drop: the
                # trial's state, read again, says whether this write is already done.
                if attempts > 1 and self.backend.get_trial(trial_id).state == state:
                    return True
                raise

        return bool(self._retry(write))

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.cached.check_trial_is_updatable(trial_id, trial_state)

    def remove_session(self) -> None:
        self.backend.remove_session()

    def record_heartbeat(self, trial_id: int) -> None:
        if self.lost is not None:
            return
        try:
            self.cached.record_heartbeat(trial_id)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self.backend.scoped_session.remove()
            log.debug("heartbeat of trial id %d missed: %s", trial_id, _cause_line(exc))

    def get_heartbeat_interval(self) -> int | None:
        return self.cached.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[..., None] | None:
        return self.cached.get_heartbeat_stale_trial_callback()

    def get_failed_trial_callback(self) -> Callable[..., None] | None:  # Optuna's older name
        return self.cached.get_heartbeat_stale_trial_callback()


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
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.is_file():
            raise StudyError(
                f"storage {url!r} does not exist; run `autocompress search` first "
                "or pass the --storage a search wrote to"
            )
        if not create:
            _refuse_non_study_file(path, url)  # a reader must never write a schema into it
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
            return _ResilientStorage(backend, settings.db_retry_s)
        except Exception as exc:
            last = exc
            if not _is_transient(exc) or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)
    raise StudyError(f"cannot open storage {masked_url(url)!r}: {one_line(last)}; check the "
                     "URL (e.g. sqlite:///studies/demo.db or postgresql://user:pw@host/db) and "
                     "that the database server is running")


def _refuse_non_study_file(path: Path, url: str) -> None:
    """A file a reader is pointed at must be a SQLite database holding Optuna's tables;
    opening anything else through Optuna would write a fresh schema into it."""
    try:
        with path.open("rb") as handle:
            header = handle.read(16)
        ok = header == b"SQLite format 3\x00"
        if ok:
            connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
            try:
                ok = connection.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'"
                ).fetchone() is not None
            finally:
                connection.close()
    except (OSError, sqlite3.Error) as exc:
        raise StudyError(f"cannot read storage {url!r} ({one_line(exc)}); check the path and "
                         "its permissions") from None
    if not ok:
        raise StudyError(f"storage {url!r} is not a study database (no Optuna tables in it); "
                         "pass the --storage a search wrote to")


def _cause_line(exc: BaseException) -> str:
    """The first line of the innermost cause: the driver's words ("connection refused"),
    not the wrapper's ("An exception is raised during the commit")."""
    *_, root = _exception_chain(exc)
    return one_line(getattr(root, "orig", None) or root)


# Connection errors that waiting will not fix: a wrong password, user, host or database name.
_FATAL_RE = re.compile(r"authentication failed|no password supplied|could not translate host"
                       r"|invalid dsn|(database|role) \"[^\"]*\" does not exist")


def _is_transient(exc: BaseException) -> bool:
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
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
