"""The service's state in the study database: projects, hashed tokens, registered datasets,
jobs and the leases of the workers on them; claims that cannot collide and the fair pick
across projects. The tables and transactions: ``store_db``; the contract: docs/service.md."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from autocompress.config.options import SearchConfig
from autocompress.errors import InputError
from autocompress.service.claims import Claims
from autocompress.service.store_db import (
    ACTIVE,
    Database,
    Job,
    datasets,
    jobs,
    locked,
    projects,
    row_job,
    tokens,
)
from autocompress.study.storage import worker_settings
from autocompress.study.urls import require_url

DEFAULT_SERVICE_DB = "sqlite:///studies/service.db"
ENV_SERVICE_DB = "AUTOCOMPRESS_SERVICE_DB"
ENV_WORKERS_PER_JOB = "AUTOCOMPRESS_WORKERS_PER_JOB"
# PostgreSQL: at most this many workers share one job (SQLite: one)
WORKERS_PER_JOB = 4
STATES = ("queued", "running", "done", "failed", "cancelled")
TOKEN_PREFIX = "ac_"
_PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_JOB_ID_RE = re.compile(r"[0-9a-f]{12}")
_DEFAULT_TRIALS = next(f.default for f in dataclasses.fields(SearchConfig) if f.name == "trials")


def service_db_url(given: str | None = None) -> str:
    """The service database: ``given`` (--storage), else $AUTOCOMPRESS_SERVICE_DB, else the
    default SQLite file."""
    if given is not None:
        return require_url(given)
    return os.environ.get(ENV_SERVICE_DB) or DEFAULT_SERVICE_DB


def new_job_id() -> str:
    """A fresh job id (12 hex digits): uploads are stored under it before the job is."""
    return secrets.token_hex(6)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _check_project_name(name: str) -> None:
    if not isinstance(name, str) or not _PROJECT_RE.fullmatch(name):
        raise InputError(f"project name {name!r} is invalid; use 1-40 lowercase letters, "
                         "digits and '-', starting with a letter or digit (e.g. vision-team)")


class JobStore(Claims):
    """The service's tables at ``url`` (created on first use). ``stale_after_s``: a lease not
    refreshed for this long is dropped (default 3 heartbeat intervals); ``workers_per_job``:
    how many workers may share a job (SQLite: 1; PostgreSQL: $AUTOCOMPRESS_WORKERS_PER_JOB or
    4, and never more than the trials it has left)."""

    def __init__(self, url: str | None = None, *, stale_after_s: float | None = None,
                 workers_per_job: int | None = None, retry_s: float | None = None) -> None:
        self.url = service_db_url(url)
        self._db = Database(self.url, retry_s=retry_s)
        self.stale_after_s = (3.0 * worker_settings().heartbeat_interval_s
                              if stale_after_s is None else float(stale_after_s))
        if workers_per_job is None:
            workers_per_job = 1 if self._db.is_sqlite else _env_workers_per_job()
        self.workers_per_job = max(1, workers_per_job)

    def close(self) -> None:
        self._db.close()

    # -- projects, tokens, datasets -----------------------------------------------------

    def create_project(self, name: str) -> None:
        _check_project_name(name)

        def work(conn: Connection) -> None:
            if _project_exists(conn, name):
                raise InputError(f"project {name!r} already exists; pick another name, or "
                                 f"create a token for it: autocompress admin token create {name}")
            conn.execute(projects.insert().values(name=name, created_at=time.time()))

        self._db.run(work, write=True)

    def projects(self) -> list[dict[str, Any]]:
        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(projects).order_by(projects.c.name))
            return [dict(r._mapping) for r in rows]

        return self._db.run(work)

    def create_token(self, project: str, label: str = "") -> tuple[str, str]:
        """A new token of ``project``: (its id, the secret, which only this call returns)."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(6)

        def work(conn: Connection) -> None:
            _require_project(conn, project)
            conn.execute(tokens.insert().values(
                id=token_id, project=project, sha256=hash_token(secret),
                label=str(label or "")[:200], created_at=time.time(), revoked_at=None))

        self._db.run(work, write=True)
        return token_id, secret

    def revoke_token(self, token_id: str) -> None:
        def work(conn: Connection) -> None:
            found = conn.execute(sa.select(tokens.c.revoked_at)
                                 .where(tokens.c.id == token_id)).first()
            if found is None:
                raise InputError(f"token {token_id!r} is unknown; list the ids with: "
                                 "autocompress admin token list")
            if found.revoked_at is None:
                conn.execute(tokens.update().where(tokens.c.id == token_id)
                             .values(revoked_at=time.time()))

        self._db.run(work, write=True)

    def tokens(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every token (of ``project``): id, project, label, created_at, revoked_at; never
        a secret or its hash."""
        columns = [tokens.c.id, tokens.c.project, tokens.c.label, tokens.c.created_at,
                   tokens.c.revoked_at]
        query = sa.select(*columns).order_by(tokens.c.created_at, tokens.c.id)
        if project is not None:
            query = query.where(tokens.c.project == project)
        return self._db.run(lambda conn: [dict(r._mapping) for r in conn.execute(query)])

    def project_for_token(self, secret: str) -> str | None:
        """The project of a live token; None for an unknown or revoked one."""
        if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX) \
                or len(secret) > 200:
            return None
        query = sa.select(tokens.c.project).where(tokens.c.sha256 == hash_token(secret),
                                                  tokens.c.revoked_at.is_(None))
        return self._db.run(lambda conn: conn.execute(query).scalar())

    def register_dataset(self, name: str, data_spec: str, project: str | None = None) -> bool:
        """Register (or re-point) ``dataset:NAME`` for ``project`` (None: every project).
        True when it was new."""
        if not isinstance(name, str) or not _DATASET_RE.fullmatch(name):
            raise InputError(f"dataset name {name!r} is invalid; use up to 64 letters, digits, "
                             "'_', '-' and '.', starting with a letter or digit")
        if not str(data_spec or "").strip():
            raise InputError("the dataset's data spec is empty; pass one as for --data, e.g. "
                             "imagefolder:/data/flowers")
        where = sa.and_(datasets.c.name == name, datasets.c.project.is_(None) if project is None
                        else datasets.c.project == project)

        def work(conn: Connection) -> bool:
            if project is not None:
                _require_project(conn, project)
            updated = conn.execute(datasets.update().where(where)
                                   .values(data_spec=data_spec)).rowcount
            if not updated:
                conn.execute(datasets.insert().values(name=name, project=project,
                                                      data_spec=data_spec,
                                                      created_at=time.time()))
            return not updated

        return self._db.run(work, write=True)

    def datasets(self) -> list[dict[str, Any]]:
        """Every registered dataset (name, project or None, data_spec): for the operator."""
        query = sa.select(datasets.c.name, datasets.c.project, datasets.c.data_spec) \
            .order_by(datasets.c.name, datasets.c.project)
        return self._db.run(lambda conn: [dict(r._mapping) for r in conn.execute(query)])

    def dataset_names(self, project: str) -> list[str]:
        """The dataset names ``project`` may use (its own and the shared); never the specs,
        which are server paths."""
        query = sa.select(datasets.c.name).where(
            sa.or_(datasets.c.project == project, datasets.c.project.is_(None)))
        return sorted({r for r in self._db.run(lambda conn: conn.execute(query).scalars().all())})

    def dataset_spec(self, name: str, project: str) -> str | None:
        """The data spec of ``dataset:NAME`` for ``project``: its own first, then the shared."""

        def work(conn: Connection) -> str | None:
            for owner in (datasets.c.project == project, datasets.c.project.is_(None)):
                spec = conn.execute(sa.select(datasets.c.data_spec)
                                    .where(datasets.c.name == name, owner)).scalar()
                if spec is not None:
                    return str(spec)
            return None

        return self._db.run(work)

    # -- jobs, as a project sees them ---------------------------------------------------

    def submit(self, project: str, spec: dict[str, Any], *, job_id: str | None = None) -> Job:
        """Queue a job (``spec`` already checked by jobspec). ``job_id``: the id its uploads
        were stored under (``new_job_id()``); default a fresh one."""
        job_id = job_id or new_job_id()
        if not _JOB_ID_RE.fullmatch(job_id):
            raise InputError(f"job id {job_id!r} is invalid; use new_job_id()")
        limit = spec.get("time_limit")
        row = {"id": job_id, "project": project, "state": "queued", "spec": json.dumps(spec),
               "study": f"job-{job_id}", "submitted_at": time.time(), "started_at": None,
               "finished_at": None, "error": None, "cancel_requested": False,
               "trials_target": int(spec.get("trials") or _DEFAULT_TRIALS),
               "time_limit_s": None if limit is None else float(limit) * 60.0,
               "seconds_used": 0.0, "trials_done": 0, "heartbeat_at": None,
               "attempts": 0}

        def work(conn: Connection) -> Job:
            _require_project(conn, project)
            if conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first():
                raise InputError(f"job {job_id} already exists; submit with a new id")
            conn.execute(jobs.insert().values(**row))
            return row_job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

        return self._db.run(work, write=True)

    def jobs(self, project: str, *, limit: int | None = None) -> list[Job]:
        """The project's jobs, newest first."""
        query = sa.select(jobs).where(jobs.c.project == project) \
            .order_by(jobs.c.submitted_at.desc(), jobs.c.id.desc()).limit(limit)

        def work(conn: Connection) -> list[Job]:
            rows = conn.execute(query).all()
            counts = self._live_counts(conn, time.time(), [r.id for r in rows])
            return [row_job(r, counts.get(r.id, 0)) for r in rows]

        return self._db.run(work)

    def job(self, project: str, job_id: str) -> Job | None:
        """The job, or None for an unknown id and for another project's job alike."""
        query = sa.select(jobs).where(jobs.c.id == str(job_id), jobs.c.project == project)

        def work(conn: Connection) -> Job | None:
            row = conn.execute(query).first()
            if row is None:
                return None
            return row_job(row, self._live_counts(conn, time.time(), [row.id]).get(row.id, 0))

        return self._db.run(work)

    def cancel(self, project: str, job_id: str) -> Job | None:
        """Cancel: a job no worker holds is cancelled now; a running one gets the flag its
        worker reads after the trial it is in. None as ``job``."""

        def work(conn: Connection) -> Job | None:
            now = time.time()
            row = conn.execute(locked(sa.select(jobs).where(
                jobs.c.id == str(job_id), jobs.c.project == project))).first()
            if row is None:
                return None
            if row.state in ACTIVE:
                values: dict[str, Any] = {"cancel_requested": True}
                if not self._live_counts(conn, now, [row.id]):
                    values.update(state="cancelled", finished_at=now)
                conn.execute(jobs.update().where(jobs.c.id == row.id).values(**values))
            fresh = conn.execute(sa.select(jobs).where(jobs.c.id == row.id)).one()
            return row_job(fresh, self._live_counts(conn, now, [row.id]).get(row.id, 0))

        return self._db.run(work, write=True)

    # -- the workers' side: claims.py ---------------------------------------------------

def _project_exists(conn: Connection, name: str) -> bool:
    return conn.execute(sa.select(projects.c.name).where(projects.c.name == name)).first() \
        is not None


def _require_project(conn: Connection, name: str) -> None:
    if not _project_exists(conn, name):
        raise InputError(f"project {name!r} does not exist; create it first: "
                         f"autocompress admin project create {name}")


def _env_workers_per_job() -> int:
    text = os.environ.get(ENV_WORKERS_PER_JOB, "").strip()
    if not text:
        return WORKERS_PER_JOB
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{ENV_WORKERS_PER_JOB}={text!r} must be a whole number >= 1 "
                         f"(e.g. {WORKERS_PER_JOB}); unset it for the default")
    return int(text)


__all__ = ["ACTIVE", "DEFAULT_SERVICE_DB", "ENV_SERVICE_DB", "STATES", "Job", "JobStore",
           "hash_token", "new_job_id", "service_db_url"]
