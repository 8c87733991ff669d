"""Queued trials: enqueue with fixed parameters (first when asked for now), once per study
across workers under a PostgreSQL advisory lock."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import exc as sa_exc

from autocompress.errors import StudyError
from autocompress.study import attrs as trial_attrs
from autocompress.study.resilient import cause_line
from autocompress.study.urls import masked_url
from autocompress.study.worker import QUEUE_FIRST_ATTR


def enqueue(study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any], *,
            first: bool = False) -> None:
    """Queue a trial with fixed params; ``first``: before every trial queued without it (the
    worker that queued it runs it next, see ``WorkerStudy._pop_waiting_trial_id``)."""
    if first:
        attrs = {**attrs, QUEUE_FIRST_ATTR: True}
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Serialise a check-then-write across workers of one study (a PostgreSQL advisory lock;
    SQLite needs none: ``single_sqlite_worker`` already admits one worker)."""
    storage = getattr(study, "resilient", None)
    if storage is None or storage.engine.dialect.name != "postgresql":
        yield
        return
    digest = hashlib.sha256(f"autocompress:{study.study_name}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    try:
        conn = storage.engine.connect()
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
    except sa_exc.SQLAlchemyError as exc:
        raise StudyError(f"cannot lock study {study.study_name!r} in "
                         f"{masked_url(storage.url)} ({cause_line(exc)}); check the database "
                         "is up and rerun the same command") from None
    try:
        yield
    finally:
        # An unlock that cannot be sent means a dead connection: its server session, and the
        # lock with it, ended already.
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        conn.close()


def enqueue_baselines(study: optuna.Study, baselines: Sequence[tuple[str, dict[str, Any]]]) -> int:
    """Queue the baseline trials (name, params) once per study, even when workers start at the
    same instant; returns how many this worker queued (0 when the study has them already).

    Any worker may pick a queued baseline up (Optuna hands out queued trials first), so a
    worker that queued k baselines should run k extra trials: the study then holds the
    baselines plus N search trials per worker, whoever ran what.
    """
    return enqueue_once(study, baselines, trial_attrs.BASELINE)


def enqueue_once(
    study: optuna.Study, named: Sequence[tuple[str, dict[str, Any]]], attr: str
) -> int:
    """Queue each (name, params) whose name no trial of the study carries in user attribute
    ``attr`` yet; race-safe across workers. Returns how many this worker queued."""
    with study_lock(study):
        have = {t.user_attrs.get(attr) for t in study.get_trials(deepcopy=False)}
        missing = [(name, params) for name, params in named if name not in have]
        for name, params in missing:
            enqueue(study, params, {attr: name})
    return len(missing)
