"""A study storage that survives a database outage: connection errors recognised through
their whole cause chain and every storage call retried with back-off, by composition."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage

# Optuna's caching layer: every Study wraps an RDBStorage in it. Ours wraps it in turn, so it
# is built here (the one place that names a private Optuna module; Optuna 5.0).
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc

from autocompress.errors import StudyError, one_line
from autocompress.study.urls import masked_url

log = logging.getLogger("autocompress")

DB_RETRY_S = 30.0
MAX_BACKOFF_S = 8.0


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


def cause_line(exc: BaseException) -> str:
    """The first line of the innermost cause: the driver's words ("connection refused"),
    not the wrapper's ("An exception is raised during the commit")."""
    *_, root = _exception_chain(exc)
    return one_line(getattr(root, "orig", None) or root)


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
    def call(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: getattr(self.cached, name)(*args, **kwargs))

    call.__name__ = name
    call.__doc__ = f"``{name}`` of the cached RDB storage, retried through an outage."
    return call


class ResilientStorage(BaseStorage, BaseHeartbeat):
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
                                "up to %.0f s", cause_line(exc), self.retry_s)
                waited = now - started
                if waited >= self.retry_s:
                    self.lost = StudyError(
                        f"lost the connection to the study database {masked_url(self.url)} "
                        f"({cause_line(exc)}) after {waited:.0f} s; the study is consistent: "
                        "rerun the same command to resume"
                    )
                    raise StudyError(str(self.lost)) from None
                self.backend.scoped_session.remove()  # drop this thread's broken session
                time.sleep(min(delay, self.retry_s - waited))
                delay = min(2 * delay, MAX_BACKOFF_S)
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
            log.debug("heartbeat of trial id %d missed: %s", trial_id, cause_line(exc))

    def get_heartbeat_interval(self) -> int | None:
        return self.cached.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[..., None] | None:
        return self.cached.get_heartbeat_stale_trial_callback()

    def get_failed_trial_callback(self) -> Callable[..., None] | None:  # Optuna's older name
        return self.cached.get_heartbeat_stale_trial_callback()
