"""Opening the study database read-only, and riding out a writer's lock.

Only Optuna's public API is used (``RDBStorage``, ``optuna.get_all_study_summaries``).
SQLite databases are opened with ``mode=ro`` so the dashboard cannot write even by accident
(Optuna's storage constructor would otherwise create tables in an empty file).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna

from autocompress.errors import StudyError, one_line
from autocompress.study.urls import driver_url, masked_url, read_only_sqlite_url, sqlite_path

_T = TypeVar("_T")


class Missing(LookupError):
    """A study, trial or artifact the URL names does not exist; message says what does."""

    def __init__(self, message: str, existing: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.existing = existing


def open_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """Open an existing study database read-only, or raise a one-line StudyError.

    Returns the same cached wrapper ``optuna.load_study(storage=URL)`` builds, but kept for
    the app's lifetime: finished trials never change, so each 2-second poll reads only new
    and running trials instead of the whole study (1000 trials: seconds -> milliseconds).
    """
    path = sqlite_path(storage_url)
    url = storage_url
    if path is not None:
        if not path.is_file():
            raise StudyError(
                f"no study database at {path} (from {storage_url}); run `autocompress search` "
                "first or pass the --storage URL it used"
            )
        url = read_only_sqlite_url(path)
    try:
        storage = optuna.storages.get_storage(
            optuna.storages.RDBStorage(driver_url(url), engine_kwargs=_engine_kwargs(url))
        )
        optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as exc:  # any driver/schema error: the user needs the one line
        if "read-only" in str(exc) or "readonly" in str(exc):
            # Opening read-only refused to create Optuna's tables: nothing was ever stored.
            raise StudyError(
                f"storage {masked_url(storage_url)} holds no Optuna study tables; run "
                "`autocompress search` with this --storage first"
            ) from None
        raise StudyError(
            f"cannot open study storage {masked_url(storage_url)}: {one_line(exc)}; check "
            "the URL and that it is an Optuna database"
        ) from None
    return storage


def _engine_kwargs(url: str) -> dict[str, Any]:
    """Fail fast on an unreachable server; on PostgreSQL make every transaction read-only."""
    if url.startswith("postgresql"):
        return {
            "connect_args": {
                "connect_timeout": 10,
                "options": "-c default_transaction_read_only=on",
            }
        }
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": 10}}
    return {}


def retry(fn: Callable[[], _T]) -> _T:
    """SQLite readers can meet a writer's lock for a moment; try again before failing."""
    for attempt in range(3):
        try:
            return fn()
        except Missing:
            raise
        except Exception as exc:
            if "locked" not in str(exc) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def iso(value: _dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
