"""The service's worker: claim a queued job, run its search, keep its lease alive, release it.

A job's cancel flag, another project's turn (the fair pick) and a worker asked to stop reach
the running search through ``run_search``'s ``stop_request``, asked after every trial: the run
ends there and every finished trial stays in the job's study. A job that cannot run (a model
or data that does not load) fails with that reason and the worker goes on with the next one;
a database that is briefly gone is waited out with back-off, never a crash. torch is imported
only when a job runs (``autocompress.search.loop``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from autocompress.errors import AutocompressError, StudyError, one_line
from autocompress.study import attrs as trial_attrs
from autocompress.study.resilient import is_connection_error
from autocompress.study.urls import masked_url, sqlite_path

Log = Callable[[str], None]
_logger = logging.getLogger("autocompress.service")
T = TypeVar("T")

CANCELLED = "cancelled"
STOPPING = "worker stopping"
TARGET_REACHED = "the job's trial target is reached"
OTHERS_FINISH = "the job's last trials are running on the other workers sharing it"
LEASE_LOST = "this worker's lease on the job was lost (it stalled and another worker took over)"
# Back-off while the database is gone: 1 s doubling to this, for as long as it takes.
MAX_WAIT_S = 30.0
# How long a finished job's release is retried before its lease is left to expire (another
# worker then resumes the job: nothing finished is lost, the study holds every trial).
RELEASE_PATIENCE_S = 120.0
# Words in the study layer's and the store's one-line errors when the database went away.
_OUTAGE_WORDS = ("lost the connection to the study database", "cannot open storage",
                 "is unreachable")


def new_worker_id() -> str:
    """``host-pid-random``: unique across machines, readable in the leases table."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached (worth waiting out), as
    opposed to a job that cannot run."""
    if is_connection_error(exc):
        return True
    return isinstance(exc, StudyError) and any(word in str(exc) for word in _OUTAGE_WORDS)


class _Patience:
    """Waits out a database outage: one line when it starts, one when it ends, and back-off
    from 1 s doubling to ``MAX_WAIT_S`` between tries (cut short when the worker stops)."""

    def __init__(self, log: Log, stop: threading.Event) -> None:
        self.log = log
        self.stop = stop
        self.since: float | None = None
        self.delay = 1.0

    def failed(self, what: str, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            kind = "database unavailable" if is_outage(exc) else "unexpected error"
            self.log(f"{kind} while {what} ({one_line(exc, typed=not is_outage(exc))}); "
                     f"retrying with back-off up to {MAX_WAIT_S:.0f} s")
        self.stop.wait(self.delay)
        self.delay = min(2 * self.delay, MAX_WAIT_S)

    def ok(self) -> None:
        if self.since is not None:
            self.log(f"database reachable again after {time.monotonic() - self.since:.0f} s")
        self.since = None
        self.delay = 1.0


class _Heartbeat(threading.Thread):
    """Refreshes the job's lease every ``interval`` seconds while a trial runs (a long trial
    would otherwise let the lease go stale and the job be claimed twice)."""

    def __init__(self, beat: Callable[[], None], interval: float, log: Log) -> None:
        super().__init__(name="autocompress-lease-heartbeat", daemon=True)
        self.beat = beat
        self.interval = interval
        self.log = log
        self.done = threading.Event()

    def run(self) -> None:
        missed = False
        while not self.done.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # the next beat is the retry; say so once
                if not missed:
                    self.log(f"lease heartbeat missed ({one_line(exc)}); retrying")
                missed = True
            else:
                missed = False

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


class _Turn:
    """One job's run on this worker: what ``run_search`` asks after every trial (cancel,
    fair turn, worker stopping, target reached by others) and the trials it finished."""

    def __init__(self, worker: _Worker, job: Any) -> None:
        self.worker = worker
        self.job = job
        self.why: str | None = None  # the reason this turn was asked to end
        self.trials = 0  # search trials this turn finished (what --trials counts)
        self.unrecorded = 0  # of them, those the database missed (added at the release)
        # the search trials this turn's run_search was given: past them it promotes
        self.left = _left(job)[0]

    def stop_request(self) -> str | None:
        self.why = self._why()
        return self.why

    def _why(self) -> str | None:
        if self.worker.stop.is_set():
            return STOPPING
        try:
            return self._job_why()
        except Exception as exc:  # the database briefly gone: keep running, ask again later
            self.worker.log(f"job {self.job.id}: could not check for cancel or turn "
                            f"({one_line(exc)}); going on")
            return None

    def _job_why(self) -> str | None:
        store, job, wid = self.worker.store, self.job, self.worker.worker_id
        if not store.heartbeat(wid, job.id):
            return LEASE_LOST
        now = store.job(job.project, job.id)
        if now is None or now.cancel_requested or now.state == "cancelled":
            return CANCELLED
        if self.left is not None and self.trials >= self.left:
            # this turn's own search is over and run_search promotes now (it ends by itself:
            # a stop here would skip the promotions)
            return None
        target = job.trials_target
        others = now.trials_done - job.trials_done - (self.trials - self.unrecorded)
        if target and others > 0 and now.trials_done + self.unrecorded >= target:
            return TARGET_REACHED  # other workers sharing this job got there
        if target and now.workers > 1 and now.trials_done + now.workers - 1 >= target:
            # the trials the others sharing the job are running now make up the rest:
            # one more here would overshoot the target
            return OTHERS_FINISH
        if not self.trials:
            # a turn runs one fine-tuned trial at least: yielding after the baselines or
            # the start-up alone would spend a claim's set-up on nothing
            return None
        return store.should_yield(wid, job.id)

    def on_progress(self, progress: Any) -> None:
        record = progress.last
        if record.baseline is not None or record.rejected is not None or \
                record.attrs.get(trial_attrs.PARENT) is not None:
            return  # baselines, rejections and promotions are not what --trials counts
        self.trials += 1
        try:
            self.worker.store.add_trials(self.job.id, 1)
        except Exception as exc:  # the release adds it
            self.unrecorded += 1
            self.worker.log(f"job {self.job.id}: progress not recorded ({one_line(exc)})")


class _Worker:
    """The loop's state: the store, this worker's id, where artifacts live, the stop flag."""

    def __init__(self, store: Any, storage_url: str, artifacts: str, worker_id: str,
                 stop: threading.Event, log: Log) -> None:
        self.store = store
        self.storage_url = storage_url
        self.artifacts = artifacts
        self.worker_id = worker_id
        self.stop = stop
        self.log = log
        self.patience = _Patience(log, stop)

    def claim(self) -> Any | None:
        try:
            job = self.store.claim(self.worker_id)
        except Exception as exc:
            self.patience.failed("claiming a job", exc)
            return None
        self.patience.ok()
        return job

    def handle(self, job: Any) -> None:
        """Run one claimed job and release it, whatever happens inside."""
        from autocompress.study.storage import worker_settings

        started = time.monotonic()
        turn = _Turn(self, job)
        beat = _Heartbeat(lambda: self.store.heartbeat(self.worker_id, job.id),
                          worker_settings().heartbeat_interval_s, self.log)
        beat.start()
        outcome, error = "paused", None
        try:
            outcome, error = self._run(job, turn)
        except KeyboardInterrupt:  # a second SIGTERM or Ctrl-C: hand the job back at once
            beat.stop()  # first: a beat after the release would write the lease back
            self.release(job, "paused", None, time.monotonic() - started, turn.unrecorded)
            raise
        finally:
            beat.stop()
        self.release(job, outcome, error, time.monotonic() - started, turn.unrecorded)
        self._tidy(job)
        self.log(f"job {job.id} ({job.project}): {outcome}" + (f": {error}" if error else "")
                 + f" ({turn.trials} trial(s) this turn, {time.monotonic() - started:.0f} s)")

    def _tidy(self, job: Any) -> None:
        """The job's uploads on this machine go once it ended and no worker holds it."""
        from autocompress.service.uploads import remove_job_files

        with contextlib.suppress(Exception):  # the database away: kept, no harm done
            now = self.store.job(job.project, job.id)
            if now is None or (now.finished and not now.workers):
                remove_job_files(job.id)

    def _run(self, job: Any, turn: _Turn) -> tuple[str, str | None]:
        """The job's outcome and its one-line reason; never raises an Exception."""
        try:
            return _search(self, job, turn)
        except Exception as exc:
            if is_outage(exc):
                self.log(f"job {job.id}: the database went away mid-run ({one_line(exc)}); "
                         "handing the job back, finished trials are kept")
                return "paused", None
            if isinstance(exc, AutocompressError):
                return "failed", one_line(exc, whole=True, limit=500)
            # a bug, not the job's fault: the job says so in one line, the operator's log
            # keeps the traceback to report
            _logger.error("job %s failed with an internal error", job.id, exc_info=exc)
            return "failed", f"internal error: {one_line(exc, typed=True)}"

    def release(self, job: Any, outcome: str, error: str | None, seconds: float,
                trials: int = 0) -> None:
        """Release the lease, retried while the database is gone (then the lease expires and
        another worker resumes the job)."""
        deadline = time.monotonic() + RELEASE_PATIENCE_S
        delay = 1.0
        while True:
            try:
                self.store.release(self.worker_id, job.id, outcome, error=error,
                                   seconds=seconds, trials=trials)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    self.log(f"job {job.id}: could not record {outcome!r} ({one_line(exc)}); "
                             "its lease expires and another worker resumes it")
                    return
                time.sleep(delay)
                delay = min(2 * delay, MAX_WAIT_S)


def _left(job: Any) -> tuple[int | None, float | None]:
    """What is left of the job's trial target and of its time limit (minutes)."""
    trials = None if not job.trials_target else job.trials_target - job.trials_done
    minutes = None
    if job.time_limit_s:
        minutes = (job.time_limit_s - (job.seconds_used or 0.0)) / 60.0
    return trials, minutes


def _search(worker: _Worker, job: Any, turn: _Turn) -> tuple[str, str | None]:
    """Materialise the job's uploads, build its search and run it until done or stopped."""
    import dataclasses

    trials, minutes = _left(job)
    if (trials is not None and trials <= 0) or (minutes is not None and minutes <= 0):
        return "done", None  # nothing left: another worker finished it, or its time is used
    from autocompress.search.loop import run_search  # torch: only when a job runs
    from autocompress.service import jobspec, uploads

    _study_tables(worker.storage_url)
    # a fixed folder per job: the model and data specs its study records (and a resume or a
    # second worker must match) name the same paths on every turn
    files = uploads.materialize_job(worker.artifacts, job.id, job.spec)
    config = jobspec.to_config(
        job.spec, study=job.study, storage=worker.storage_url, artifacts=worker.artifacts,
        files_dir=files, dataset_spec=lambda name: worker.store.dataset_spec(name, job.project))
    left: dict[str, Any] = {}
    if trials is not None:
        left["trials"] = trials
    if minutes is not None:
        left["time_limit"] = minutes
    config = dataclasses.replace(config, **left)
    worker.log(f"job {job.id} ({job.project}): running study {job.study!r}"
               + (f", {trials} trial(s) left" if trials is not None else "")
               + (f", {minutes:.1f} min left" if minutes is not None else ""))
    result = run_search(config, on_progress=turn.on_progress, stop_request=turn.stop_request)
    if turn.why == CANCELLED:
        return "cancelled", None
    if turn.why is not None and turn.why != TARGET_REACHED:
        return "paused", None  # another project's turn, or this worker stopping
    return "done", None if turn.why else result.stop_reason


def _study_tables(storage_url: str) -> None:
    """Optuna's tables beside the service's in a SQLite file: a search refuses to write a
    study into a SQLite file that holds other tables only (another program's, as far as it
    can tell). PostgreSQL has no such check; its schema is made by the search as usual."""
    if sqlite_path(storage_url) is None:
        return
    from optuna.storages import RDBStorage

    from autocompress.study.urls import driver_url

    RDBStorage(driver_url(storage_url)).engine.dispose()


@contextlib.contextmanager
def _one_sqlite_worker(storage_url: str) -> Iterator[None]:
    """SQLite serves one worker (its searches write one file): a second worker on the same
    file is refused at start, not found out by failing a job."""
    path = sqlite_path(storage_url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".worker.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another worker (or `autocompress serve`'s own) already runs the "
                             f"jobs of {path}; SQLite serves one worker: stop it, or use "
                             "PostgreSQL (--storage postgresql://user:pw@host/db) for several"
                             ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_worker(storage_url: str, artifacts: str, *, worker_id: str | None = None,
               once: bool = False, stop_event: threading.Event | None = None,
               poll_s: float = 2.0, log: Log = print) -> int:
    """Claim and run jobs until ``stop_event`` is set (``once``: until no job is left to
    claim); returns how many jobs this worker handled. A stop request ends the running job
    after its current trial (released ``paused``: the next claim resumes it)."""
    stop = stop_event or threading.Event()
    wid = worker_id or new_worker_id()
    handled = 0
    with _one_sqlite_worker(storage_url):
        store = _open_store(storage_url, _Patience(log, stop))
        if store is None:
            return 0  # stopped while the database was still away
        worker = _Worker(store, storage_url, artifacts, wid, stop, log)
        log(f"worker {wid} started: jobs from {masked_url(storage_url)}, artifacts in "
            f"{artifacts}")
        while not stop.is_set():
            job = worker.claim()
            if job is None:
                if once and worker.patience.since is None:
                    break
                if worker.patience.since is None:
                    stop.wait(poll_s)
                continue
            worker.handle(job)
            handled += 1
    log(f"worker {wid} stopped after {handled} job(s)")
    return handled


def _open_store(storage_url: str, patience: _Patience) -> Any | None:
    """The job store, waited for while the database is unreachable (a worker started with
    its database, e.g. by compose, must not exit because the database is slower to start);
    a wrong URL or password is raised at once. None: stopped while waiting."""
    from autocompress.service.store import JobStore

    while not patience.stop.is_set():
        try:
            store = JobStore(storage_url)
        except Exception as exc:
            if not is_outage(exc):
                raise
            patience.failed("opening the service database", exc)
            continue
        patience.ok()
        return store
    return None
