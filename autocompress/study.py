"""The Optuna adapter: storage URLs, study creation and resume, samplers, artifacts, records.

Everything that knows Optuna's API lives here (the search space's ``suggest_*`` calls are in
``space.py`` behind a protocol), so an Optuna upgrade touches this file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autocompress.config import SearchConfig
from autocompress.errors import StudyError
from autocompress.pareto import TrialRecord

log = logging.getLogger("autocompress")

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
_CREATE_ATTEMPTS = 6

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- storage -------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for other backends."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def default_artifacts_dir(storage_url: str, study_name: str) -> Path:
    """Artifacts sit beside a SQLite file (``x.db`` -> ``x-artifacts/``); for server
    databases the default is ``studies/<study>-artifacts`` and workers on other machines
    must share it (``--artifacts``)."""
    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.stem + "-artifacts")
    return Path("studies") / f"{study_name}-artifacts"


def open_storage(url: str, *, heartbeat: bool = True, create: bool = True) -> RDBStorage:
    """An RDB storage with heartbeats, so a killed worker's trial is failed and retried."""
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.is_file():
            raise StudyError(
                f"storage {url!r} does not exist; run `autocompress search` first "
                "or pass the --storage a search wrote to"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": HEARTBEAT_INTERVAL_S,
            "grace_period": GRACE_PERIOD_S,
            "failed_trial_callback": RetryFailedTrialCallback(max_retry=1),
        }
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if path is None:
        engine["connect_args"] = {"connect_timeout": 10}
    last: Exception | None = None
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=engine, **kwargs)
        except Exception as exc:  # schema creation races between workers (Optuna #4621)
            last = exc
            if not _is_transient(exc):
                break
            time.sleep(0.5 * (attempt + 1))
    raise StudyError(f"cannot open storage {url!r}: {_first_line(last)}; check the URL "
                     "(e.g. sqlite:///studies/demo.db or postgresql://user:pw@host/db)")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc and str(exc).strip() else type(exc).__name__
    return text[:200]


def _is_transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
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


def artifact_store(path: str | Path) -> FileSystemArtifactStore:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


# -- studies ---------------------------------------------------------------------------------


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise StudyError(f"sampler {name!r} is unknown; use tpe, random, nsga2 or gp")


def directions(objectives: tuple[str, ...]) -> list[str]:
    return ["maximize" if o == "accuracy" else "minimize" for o in objectives]


METRIC_NAMES = {"accuracy": "accuracy", "size": "size_bytes", "latency": "latency_ms"}


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
    """
    sampler = make_sampler(config.sampler, config.seed + seed_offset)
    dirs = directions(config.objectives)
    study: optuna.Study | None = None
    last: Exception | None = None
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            study = optuna.create_study(
                study_name=config.study,
                storage=storage,
                directions=dirs,
                sampler=sampler,
                load_if_exists=True,
            )
            break
        except ValueError as exc:  # directions differ from the stored study
            raise StudyError(
                f"study {config.study!r} exists with other objectives ({exc}); "
                "use --study NEW_NAME to start a new study"
            ) from None
        except Exception as exc:
            last = exc
            if not _is_transient(exc):
                break
            time.sleep(0.3 * (attempt + 1))
    if study is None:
        raise StudyError(f"cannot create study {config.study!r}: {_first_line(last)}")

    stored = study.user_attrs
    if "identity" in stored:
        _refuse_mismatch(config, json.loads(stored["identity"]), identity)
    else:
        study.set_metric_names([METRIC_NAMES[o] for o in config.objectives])
        study.set_user_attr("identity", json.dumps(identity, sort_keys=True))
    return study


def set_study_info(study: optuna.Study, info: dict[str, Any]) -> None:
    """Descriptive attributes (inventory, data, budgets); first writer wins."""
    existing = study.user_attrs
    for key, value in info.items():
        if key not in existing:
            study.set_user_attr(key, value)


def _refuse_mismatch(config: SearchConfig, stored: dict[str, Any], now: dict[str, Any]) -> None:
    for key in ("model_spec", "weights_sha256", "data_spec", "objectives", "space_hash"):
        if stored.get(key) != now.get(key):
            raise StudyError(
                f"study {config.study!r} in {config.storage_url()} was made with a different "
                f"{key.replace('_', ' ')} ({stored.get(key)!r}, now {now.get(key)!r}); use "
                "--study NEW_NAME to start a new study, or the original settings to resume it"
            )


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name not in names:
        raise StudyError(
            f"study {study_name!r} not found in {storage_url}; existing studies: "
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


def enqueue(study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any]) -> None:
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)


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


def is_complete(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE


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


def upload(trial: optuna.Trial, store: FileSystemArtifactStore, path: Path) -> str:
    return optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial
    )


def download(store: FileSystemArtifactStore, artifact_id: str, dest: Path) -> None:
    optuna.artifacts.download_artifact(
        artifact_store=store, artifact_id=artifact_id, file_path=str(dest)
    )


TrialPruned = optuna.TrialPruned
