"""The service's tables in the study database and the one way to use them: an engine per
URL (SQLite with a busy timeout and write transactions that begin ``IMMEDIATE``; PostgreSQL
with pre-pinged connections), tables created idempotently by racing processes, and every
transaction retried with back-off while the database is briefly gone."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, Row

from autocompress.errors import StudyError, one_line
from autocompress.study.resilient import MAX_BACKOFF_S, cause_line
from autocompress.study.storage import is_transient, worker_settings
from autocompress.study.urls import driver_url, masked_url, require_url, sqlite_path

log = logging.getLogger("autocompress")

ACTIVE = ("queued", "running")

# Seconds a SQLite connection waits for another writer before "database is locked".
SQLITE_BUSY_S = 30.0

metadata = sa.MetaData()

projects = sa.Table(
    "autocompress_projects", metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

tokens = sa.Table(
    "autocompress_tokens", metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("project", sa.String(40), sa.ForeignKey("autocompress_projects.name"),
              nullable=False, index=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("label", sa.String(200), nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

datasets = sa.Table(
    "autocompress_datasets", metadata,
    sa.Column("name", sa.String(64), nullable=False, index=True),
    # NULL: every project may use it
    sa.Column("project", sa.String(40), sa.ForeignKey("autocompress_projects.name"),
              nullable=True),
    sa.Column("data_spec", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

jobs = sa.Table(
    "autocompress_jobs", metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("project", sa.String(40), sa.ForeignKey("autocompress_projects.name"),
              nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON
    sa.Column("study", sa.String(120), nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("trials_target", sa.Integer, nullable=False),
    sa.Column("time_limit_s", sa.Float, nullable=True),
    sa.Column("seconds_used", sa.Float, nullable=False, default=0.0),
    sa.Column("trials_done", sa.Integer, nullable=False, default=0),
    sa.Column("heartbeat_at", sa.Float, nullable=True),
    # leases of the job dropped stale (its worker died mid-run); too many fail the job
    sa.Column("attempts", sa.Integer, nullable=False, default=0, server_default="0"),
)
# Columns added after the first release, added to an existing table at start:
# (name, DDL type and default).
_ADDED_COLUMNS = {"autocompress_jobs": (("attempts", "INTEGER NOT NULL DEFAULT 0"),)}

leases = sa.Table(
    "autocompress_leases", metadata,
    sa.Column("job_id", sa.String(12), sa.ForeignKey("autocompress_jobs.id"),
              primary_key=True),
    sa.Column("worker_id", sa.String(200), primary_key=True),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

_T = TypeVar("_T")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; a URL that is not one is a one-line StudyError."""
    require_url(url)
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot create the folder of the service database "
                             f"{masked_url(url)!r} ({one_line(exc)}); pass --storage a path in "
                             "a folder you can write to") from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if path is None:
        kwargs["connect_args"] = {"connect_timeout": 10}
    else:
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_S}
    try:
        engine = sa.create_engine(driver_url(url), **kwargs)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
        raise StudyError(f"cannot open the service database {masked_url(url)!r}: "
                         f"{one_line(exc)}; check the URL (e.g. sqlite:///studies/service.db "
                         "or postgresql://user:pw@host/db)") from None
    if path is not None:
        _sqlite_immediate(engine)
    return engine


def _sqlite_immediate(engine: Engine) -> None:
    """pysqlite begins transactions lazily and never ``IMMEDIATE``: take the transaction over
    (SQLAlchemy's documented recipe) so a write transaction holds the write lock from its
    first statement, and two claims never read the same queue and both write."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("autocompress_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Database:
    """An engine, its tables, and transactions retried while the database is unreachable."""

    def __init__(self, url: str, *, retry_s: float | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = sqlite_path(url) is not None
        self.retry_s = worker_settings().db_retry_s if retry_s is None else retry_s
        self.retrying(self._create_tables, quiet=True)

    def _create_tables(self) -> None:
        # Two processes creating at once: one loses with "already exists" (or PostgreSQL's
        # unique violation on pg_type); is_transient counts that, and the retry finds the
        # tables made (checkfirst).
        metadata.create_all(self.engine, checkfirst=True)
        _add_columns(self.engine)

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction; ``write`` on SQLite takes the write lock at its start."""
        with self.engine.connect() as conn:
            if write and self.is_sqlite:
                conn = conn.execution_options(autocompress_write=True)
            with conn.begin():
                yield conn

    def serialise(self, conn: Connection, key: int) -> None:
        """Hold PostgreSQL's transaction-level advisory lock ``key`` until the transaction
        ends (SQLite's IMMEDIATE transaction already serialises writers)."""
        if not self.is_sqlite:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def run(self, work: Callable[[Connection], _T], *, write: bool = False) -> _T:
        """``work(conn)`` in one transaction, retried as a whole on transient errors."""

        def attempt() -> _T:
            with self.transaction(write=write) as conn:
                return work(conn)

        return self.retrying(attempt)

    def retrying(self, call: Callable[[], _T], *, quiet: bool = False) -> _T:
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                return call()
            except sa.exc.DBAPIError as exc:
                if not _transient(exc):
                    raise self.failure(exc) from None
                if time.monotonic() + delay > deadline:
                    raise self.unreachable(exc) from None
                # quiet: the table-creation race between starting processes is expected
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "service database %s: %s; retrying in %.1f s",
                        masked_url(self.url), cause_line(exc), delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)

    def unreachable(self, exc: BaseException) -> StudyError:
        return StudyError(f"the service database at {masked_url(self.url)} is unreachable "
                          f"({cause_line(exc)}) after {self.retry_s:g} s of retries; check "
                          "that the database server is running and the URL is right")

    def failure(self, exc: BaseException) -> StudyError:
        return StudyError(f"the service database at {masked_url(self.url)} refused the "
                          f"request ({cause_line(exc)}); check the URL points at a database "
                          "autocompress may write to")

    def close(self) -> None:
        self.engine.dispose()


def _add_columns(engine: Engine) -> None:
    """The columns an older version's tables lack (a racing process adding the same one
    loses with "duplicate column" / "already exists": transient, and the retry sees it)."""
    inspector = sa.inspect(engine)
    for table, columns in _ADDED_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table)}
        for name, ddl in columns:
            if name not in have:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


def _transient(exc: sa.exc.DBAPIError) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    if any(word in text for word in ("no such table", "not a database", "readonly",
                                     "unable to open")):
        return False
    return is_transient(exc)


@dataclass(frozen=True)
class Job:
    """One row of ``autocompress_jobs`` (times in epoch seconds) and ``workers``: the live
    leases on it now."""

    id: str
    project: str
    state: str
    spec: dict[str, Any]
    study: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    cancel_requested: bool
    trials_target: int
    time_limit_s: float | None
    seconds_used: float
    trials_done: int
    heartbeat_at: float | None
    attempts: int = 0
    workers: int = 0

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (the spec names uploads, never holds secrets)."""
        out = dataclasses.asdict(self)
        out["spec"] = json.loads(json.dumps(self.spec))
        return out


def row_job(row: Row[Any], workers: int = 0) -> Job:
    values = dict(row._mapping)
    values["spec"] = json.loads(values["spec"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["attempts"] = int(values.get("attempts") or 0)
    return Job(**values, workers=workers)


def locked(query: sa.Select[Any], *, skip: bool = False) -> sa.Select[Any]:
    """``query`` locking its rows on PostgreSQL (SQLite's IMMEDIATE transaction already
    serialises writers; SQLAlchemy leaves FOR UPDATE out there)."""
    return query.with_for_update(skip_locked=skip)


def live_counts(conn: Connection, oldest: float,
                job_ids: list[str] | None = None) -> dict[str, int]:
    """Leases refreshed since ``oldest`` per job (of ``job_ids``; None: every job)."""
    query = sa.select(leases.c.job_id, sa.func.count()).where(
        leases.c.heartbeat_at >= oldest).group_by(leases.c.job_id)
    if job_ids is not None:
        query = query.where(leases.c.job_id.in_(list(job_ids)))
    return {str(job_id): int(n) for job_id, n in conn.execute(query)}
