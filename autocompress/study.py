"""The Optuna adapter: storage URLs, study creation and resume, samplers, artifacts, records.

Everything that knows Optuna's API lives here (the search space's ``suggest_*`` calls are in
``space.py`` behind a protocol), so an Optuna upgrade touches this file.

Scale-out. Several ``autocompress search`` processes ("workers"), on one machine or many, share
one study when they share a PostgreSQL ``--storage``:

- ``--trials N`` means N search trials *per worker*: three workers with ``--trials 4`` add 12.
  The fp32 and int8-PTQ baselines are recorded once per study, on top.
- Creating the schema and the study is retried, so workers may start at the same instant
  (Optuna #4621: concurrent ``CREATE TABLE`` fails with ``UniqueViolation``).
- Trial numbers come from the database, so they are unique across workers.
- Heartbeats: a running trial beats every ``AUTOCOMPRESS_HEARTBEAT_INTERVAL`` s (default 10);
  one silent for ``AUTOCOMPRESS_GRACE_PERIOD`` s (default 30) belongs to a dead worker. The next
  worker to start a trial (or to start at all) marks it FAIL and queues it once more with the
  same parameters (``RetryHeartbeatStaleTrialCallback(max_retry=1)``; the retry carries the
  system attribute ``failed_trial``), and a surviving worker runs it as one of its N trials.
- A lost database connection is retried with exponential back-off for up to
  ``AUTOCOMPRESS_DB_RETRY_SECONDS`` (default 30); after that the worker stops with one
  ``StudyError`` line. Finished trials are committed one by one, so the study is consistent and
  the same command resumes it (trial numbers continue).
- Artifacts go to a folder every worker and the dashboard can reach (``--artifacts PATH`` on a
  shared filesystem) or to S3-compatible object storage (``--artifacts s3://bucket/prefix``,
  needs boto3; ``AWS_ENDPOINT_URL`` points it at MinIO and friends).
- SQLite serves one worker: a second one is refused with a message naming PostgreSQL.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from autocompress.config import SearchConfig
from autocompress.errors import StudyError, one_line
from autocompress.pareto import TrialRecord

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


# -- settings --------------------------------------------------------------------------------


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


# -- storage ---------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for other backends."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


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


# Storage calls that reach the database. The private ones are what Optuna's caching layer
# (``_CachedStorage``, used by every Study on an RDBStorage) calls on its backend.
_RETRIED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "get_trial_param", "get_trial_params", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial", "get_all_trials", "_get_trials", "get_n_trials",
    "get_best_trial", "_get_best_trial_id", "_get_stale_trial_ids",
)

# Storage calls nest (get_all_trials -> _get_trials): only the outermost one retries.
_NESTING = threading.local()


class _ResilientStorage(RDBStorage):
    """``RDBStorage`` that rides out a database outage.

    Every call retries connection errors with exponential back-off (0.25 s doubling to 8 s) for
    up to ``retry_s`` seconds in all. Past that the storage is *lost*: the call raises
    ``StudyError`` and every later call fails at once, so the worker stops promptly instead of
    waiting once more per clean-up step. Each call is one transaction, so a retried call never
    half-applies; what was committed before the outage stays, and a rerun resumes from it.
    Heartbeats never retry (the next beat is the retry) and never give up.
    """

    retry_s: float = DB_RETRY_S
    lost: StudyError | None = None

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(_NESTING, "depth", 0):
            return fn(self, *args, **kwargs)
        if self.lost is not None:
            raise StudyError(str(self.lost))
        started: float | None = None
        delay = 0.25
        while True:
            _NESTING.depth = 1
            try:
                result = fn(self, *args, **kwargs)
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
                self.scoped_session.remove()  # drop this thread's broken session
                time.sleep(min(delay, self.retry_s - waited))
                delay = min(2 * delay, _MAX_BACKOFF_S)
            else:
                if started is not None:
                    log.warning("reconnected to the study database after %.1f s",
                                time.monotonic() - started)
                return result
            finally:
                _NESTING.depth = 0

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        attempts = 0

        def write(storage: RDBStorage) -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return RDBStorage.set_trial_state_values(storage, trial_id, state, values)
            except UpdateFinishedTrialError:
                # The attempt cut off by the outage may have committed before the drop.
                if attempts > 1 and RDBStorage.get_trial(storage, trial_id).state == state:
                    return True
                raise

        return bool(self._call(write))

    def record_heartbeat(self, trial_id: int) -> None:
        if self.lost is not None:
            return
        try:
            RDBStorage.record_heartbeat(self, trial_id)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self.scoped_session.remove()
            log.debug("heartbeat of trial id %d missed: %s", trial_id, _cause_line(exc))


def _retrying(name: str) -> Callable[..., Any]:
    @functools.wraps(getattr(RDBStorage, name))
    def call(self: _ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(getattr(RDBStorage, name), *args, **kwargs)

    return call


for _name in _RETRIED_CALLS:
    if hasattr(RDBStorage, _name):  # tolerate an Optuna that renamed a private helper
        setattr(_ResilientStorage, _name, _retrying(_name))


class _RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial (same parameters, system attribute
    ``failed_trial``), minus what the dead attempt half-recorded: the retry starts with the
    ``baseline`` tag only and no artifact metadata, so every figure it shows is its own."""

    _KEEP_USER_ATTRS = ("baseline",)

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


def open_storage(url: str, *, heartbeat: bool = True, create: bool = True) -> RDBStorage:
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
        path.parent.mkdir(parents=True, exist_ok=True)
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
                storage = _ResilientStorage(url, engine_kwargs=engine, **kwargs)
            storage.retry_s = settings.db_retry_s
            return storage
        except Exception as exc:
            last = exc
            if not _is_transient(exc) or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, _MAX_BACKOFF_S)
    raise StudyError(f"cannot open storage {masked_url(url)!r}: {one_line(last)}; check the "
                     "URL (e.g. sqlite:///studies/demo.db or postgresql://user:pw@host/db) and "
                     "that the database server is running")


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


# -- artifacts -------------------------------------------------------------------------------


class ArtifactStore(Protocol):
    """What Optuna's upload/download need (``optuna.artifacts`` stores all match it)."""

    def open_reader(self, artifact_id: str) -> IO[bytes]: ...

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


# "s3://bucket/prefix"; pathlib turns "//" into "/", so "s3:/bucket/prefix" means the same.
_S3_RE = re.compile(r"^s3:/{1,2}([^/]*)/*(.*?)/*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _s3_parts(location: str) -> tuple[str, str] | None:
    match = _S3_RE.match(location)
    if match is None:
        return None
    bucket, prefix = match.groups()
    if not _BUCKET_RE.match(bucket):
        raise StudyError(f"artifact location {location!r} has no valid bucket name; write "
                         "s3://BUCKET/PREFIX, e.g. s3://ml-artifacts/autocompress/demo")
    return bucket, prefix


def is_remote_artifacts(location: str | Path | None) -> bool:
    return location is not None and _S3_RE.match(str(location)) is not None


def artifact_location(given: str | Path | None, storage_url: str, study_name: str) -> str:
    """Where a study's artifacts live, in the form to record in the study: an absolute folder
    or ``s3://bucket/prefix``. ``given`` is ``--artifacts``; None takes the default folder."""
    if given is not None and is_remote_artifacts(given):
        bucket, prefix = _s3_parts(str(given)) or ("", "")
        return f"s3://{bucket}/{prefix}".rstrip("/")
    folder = Path(given) if given else default_artifacts_dir(storage_url, study_name)
    return str(folder.resolve())


def default_artifacts_dir(storage_url: str, study_name: str) -> Path:
    """Artifacts sit beside a SQLite file (``x.db`` -> ``x-artifacts/``); for server
    databases the default is ``studies/<study>-artifacts`` and workers on other machines
    must share it (``--artifacts``)."""
    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.stem + "-artifacts")
    return Path("studies") / f"{study_name}-artifacts"


class _PrefixedStore:
    """Keys under ``prefix/`` in a bucket shared with other data (Optuna's Boto3 store writes
    at the bucket root)."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> IO[bytes]:
        return self._store.open_reader(self._prefix + artifact_id)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        self._store.write(self._prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._prefix + artifact_id)


def _s3_store(bucket: str, prefix: str) -> ArtifactStore:
    location = f"s3://{bucket}/{prefix}".rstrip("/")
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StudyError(f"artifact store {location} needs boto3, which is not installed: "
                         "pip install boto3 (or use a shared folder: --artifacts PATH)") from None
    from optuna.artifacts import Boto3ArtifactStore

    # Endpoint, region, keys and retries come from the usual AWS_* settings; botocore already
    # retries throttling and transient network errors.
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise StudyError(f"cannot use artifact bucket {bucket!r} ({one_line(exc)}); check "
                         "the bucket exists, the AWS credentials, and AWS_ENDPOINT_URL for an "
                         "S3-compatible server such as MinIO") from None
    store = Boto3ArtifactStore(bucket, client=client)
    return _PrefixedStore(store, prefix) if prefix else store


def artifact_store(location: str | Path) -> ArtifactStore:
    """The store for a folder (created if missing) or ``s3://bucket/prefix`` (needs boto3)."""
    if is_remote_artifacts(location):
        bucket, prefix = _s3_parts(str(location)) or ("", "")
        return _s3_store(bucket, prefix)
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


# -- studies ---------------------------------------------------------------------------------


def make_sampler(
    name: str, seed: int | None, startup_trials: int = 10
) -> optuna.samplers.BaseSampler:
    """``startup_trials``: trials sampled at random before TPE or GP fit their model."""
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=startup_trials
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    raise StudyError(f"sampler {name!r} is unknown; use tpe, random, nsga2 or gp")


def directions(objectives: tuple[str, ...]) -> list[str]:
    return ["maximize" if o == "accuracy" else "minimize" for o in objectives]


METRIC_NAMES = {"accuracy": "accuracy", "size": "size_bytes", "latency": "latency_ms"}


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped beating, and queue their retry.

    Optuna does this at the start of every trial; calling it when a worker starts and after
    its last trial means a dead worker's trial never lingers as RUNNING.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# Optuna's words when the trial a worker is finishing was finished by someone else.
_OVERTAKEN_RE = re.compile(r"^Cannot tell a (FAIL|COMPLETE|PRUNED) trial")


class _WorkerStudy(optuna.Study):
    """The study a search worker drives.

    ``optimize`` reports a lost database as the storage's one-line ``StudyError``: once the
    storage has given up, Optuna's own clean-up of the running trial fails too and can end in
    an unrelated error. A worker whose heartbeats arrived too late (a long outage, a paused
    machine) finds its trial failed and re-queued by another worker: it logs that and goes on
    with its remaining trials instead of crashing. After the last trial it fails stale trials
    once more, so a dead worker's trial does not linger as RUNNING.
    """

    resilient: _ResilientStorage | None = None

    def optimize(self, func: Callable[[optuna.Trial], Any], n_trials: int | None = None,
                 **kwargs: Any) -> None:
        calls = 0

        def counted(trial: optuna.Trial) -> Any:
            nonlocal calls
            calls += 1
            return func(trial)

        try:
            while n_trials is None or calls < n_trials:
                left = None if n_trials is None else n_trials - calls
                try:
                    super().optimize(counted, n_trials=left, **kwargs)
                    break
                except ValueError as exc:
                    if not _OVERTAKEN_RE.match(str(exc)) or self._lost() is not None:
                        raise
                    log.warning("this worker's trial was failed by another worker (its "
                                "heartbeats came too late) and will be run again; going on")
            fail_stale_trials(self)
        except Exception as exc:
            lost = self._lost()
            if lost is not None and not (isinstance(exc, StudyError) and str(exc) == str(lost)):
                raise StudyError(str(lost)) from None
            raise

    def _lost(self) -> StudyError | None:
        return self.resilient.lost if self.resilient is not None else None

    def _pop_waiting_trial_id(self) -> int | None:
        """Optuna's queue, oldest first, except that trials queued with QUEUE_FIRST_ATTR (a
        promotion, a refine: asked for now) go before the plans a search queued for later
        (warm starts and guided plans a time limit left waiting)."""
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: (not t.user_attrs.get(QUEUE_FIRST_ATTR),
                                                    t.number)):
            try:  # claim it; another worker may have been faster
                if not self._storage.set_trial_state_values(trial._trial_id,
                                                            state=TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            return trial._trial_id
        return None


def _worker_seed(seed: int, seed_offset: int) -> int:
    """Per-worker sampler seed. The host name is mixed in because containers often give every
    worker the same PID (1), and equal seeds make workers propose the same candidates."""
    if not seed_offset:
        return seed
    host = zlib.crc32(socket.gethostname().encode())
    return (seed + seed_offset + host) % (2**31 - 1)


def create_or_load_study(
    storage: RDBStorage,
    config: SearchConfig,
    identity: dict[str, Any],
    *,
    seed_offset: int = 0,
) -> optuna.Study:
    """Create the study once (race-safe across workers) or resume it.

    ``identity`` holds what must match for a resume: model, data, objectives, space hash.
    A mismatch is refused, because a sampler fed trials from another space learns nonsense.
    ``seed_offset`` (non-zero for server storages) gives each worker its own sampler seed.
    Trials of dead workers are failed (and queued once more) before the study is returned.
    """
    sampler = make_sampler(
        config.sampler, _worker_seed(config.seed, seed_offset), config.sampler_startup_trials()
    )
    dirs = directions(config.objectives)
    last: Exception | None = None
    created = False
    for attempt in range(6):
        try:
            optuna.create_study(
                study_name=config.study,
                storage=storage,
                directions=dirs,
                load_if_exists=True,
            )
            created = True
            break
        except ValueError as exc:  # directions differ from the stored study
            raise StudyError(
                f"study {config.study!r} exists with other objectives ({exc}); "
                "use --study NEW_NAME to start a new study"
            ) from None
        except StudyError:
            raise
        except Exception as exc:  # two workers inserting the same study name at once
            last = exc
            if not _is_transient(exc):
                break
            time.sleep(0.3 * (attempt + 1))
    if not created:
        raise StudyError(f"cannot create study {config.study!r}: {one_line(last)}")
    study = _WorkerStudy(study_name=config.study, storage=storage, sampler=sampler)
    if isinstance(storage, _ResilientStorage):
        study.resilient = storage

    stored = study.user_attrs
    if "identity" in stored:
        _refuse_mismatch(config, json.loads(stored["identity"]), identity)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([METRIC_NAMES[o] for o in config.objectives])
        study.set_user_attr("identity", json.dumps(identity, sort_keys=True))
    fail_stale_trials(study)
    return study


def set_study_info(study: optuna.Study, info: dict[str, Any]) -> None:
    """Descriptive attributes (inventory, data, budgets); first writer wins."""
    existing = study.user_attrs
    for key, value in info.items():
        if key not in existing:
            study.set_user_attr(key, value)


def _refuse_mismatch(config: SearchConfig, stored: dict[str, Any], now: dict[str, Any]) -> None:
    where = f"study {config.study!r} in {masked_url(config.storage_url())}"
    if stored.get("onnx_format", 1) != now.get("onnx_format", 1):
        # No setting brings the old layout back: the only way on is a new study.
        raise StudyError(
            f"{where} holds ONNX files in another layout (format {stored.get('onnx_format', 1)}"
            f", this autocompress writes {now.get('onnx_format', 1)}), so file sizes would not "
            "compare; use --study NEW_NAME (export and dashboard still read the old study)"
        )
    # Budgets too: the trials' feasibility was judged against them, and export's --best
    # selects against the study's budgets.
    for key in ("model_spec", "weights_sha256", "data_spec", "objectives", "space_hash",
                "budgets"):
        if stored.get(key) != now.get(key):
            raise StudyError(
                f"{where} was made with a different {key.replace('_', ' ')} "
                f"({stored.get(key)!r}, now {now.get(key)!r}); use --study NEW_NAME to start a "
                "new study, or the original settings to resume it"
            )


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name not in names:
        raise StudyError(
            f"study {study_name!r} not found in {masked_url(storage_url)}; existing studies: "
            f"{', '.join(names) or 'none'} (autocompress list shows them)"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def study_summaries(storage_url: str) -> list[dict[str, Any]]:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        identity = json.loads(summary.user_attrs.get("identity", "{}"))
        rows.append({
            "study": summary.study_name,
            "model": identity.get("model_spec", "?"),
            "data": identity.get("data_spec", "?"),
            "trials": len(states),
            "complete": states.count("COMPLETE"),
            "failed": states.count("FAIL"),
            "pruned": states.count("PRUNED"),
            "running": states.count("RUNNING"),
        })
    return rows


QUEUE_FIRST_ATTR = "queue_first"


def enqueue(study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any], *,
            first: bool = False) -> None:
    """Queue a trial with fixed params; ``first``: before every trial queued without it (the
    worker that queued it runs it next, see ``_WorkerStudy._pop_waiting_trial_id``)."""
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
                         f"{masked_url(storage.url)} ({_cause_line(exc)}); check the database "
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
    return enqueue_once(study, baselines, "baseline")


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


# -- records ---------------------------------------------------------------------------------


def to_record(trial: FrozenTrial) -> TrialRecord:
    a = trial.user_attrs
    plan = a.get("plan")
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        accuracy=a.get("accuracy"),
        test_accuracy=a.get("test_accuracy"),
        size_bytes=a.get("size_bytes"),
        latency_ms=a.get("latency_ms"),
        latency_spread_ms=a.get("latency_spread_ms"),
        latency_vs_fp32=a.get("latency_vs_fp32"),
        latency_estimate_ms=a.get("latency_estimate_ms"),
        flops=a.get("flops"),
        params=a.get("params"),
        feasible=bool(a.get("feasible", False)) and trial.state == TrialState.COMPLETE,
        baseline=a.get("baseline"),
        plan=json.loads(plan) if isinstance(plan, str) else (plan or {}),
        plan_summary=a.get("plan_summary", ""),
        rejected=a.get("rejected"),
        fail_reason=a.get("fail_reason"),
        attrs=dict(a),
    )


def records(study: optuna.Study) -> list[TrialRecord]:
    return [to_record(t) for t in study.get_trials(deepcopy=False)]


@dataclass(frozen=True)
class StudyInfo:
    """The study-level facts readers need, as plain data."""

    name: str
    storage_url: str
    identity: dict[str, Any]
    attrs: dict[str, Any]

    def json_attr(self, key: str, default: Any = None) -> Any:
        value = self.attrs.get(key, default)
        return json.loads(value) if isinstance(value, str) else value


def study_info(study: optuna.Study, storage_url: str) -> StudyInfo:
    attrs = dict(study.user_attrs)
    return StudyInfo(
        name=study.study_name,
        storage_url=storage_url,
        identity=json.loads(attrs.get("identity", "{}")),
        attrs=attrs,
    )


def upload(trial: optuna.Trial, store: ArtifactStore, path: Path) -> str:
    return optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial
    )


def download(store: ArtifactStore, artifact_id: str, dest: Path) -> None:
    optuna.artifacts.download_artifact(
        artifact_store=store, artifact_id=artifact_id, file_path=str(dest)
    )


TrialPruned = optuna.TrialPruned
