"""Studies: creation and resume, samplers, the worker's study, locks and queued trials."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc

from autocompress.config.options import SearchConfig
from autocompress.errors import StudyError, one_line
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import STALE_REASON
from autocompress.study.storage import (
    _cause_line,
    _is_transient,
    _ResilientStorage,
    log,
    masked_url,
    open_storage,
    sqlite_path,
)


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
        running: list[int] = []  # the number of the trial this worker runs now

        def counted(trial: optuna.Trial) -> Any:
            nonlocal calls
            calls += 1
            running[:] = [trial.number]
            return func(trial)

        try:
            while n_trials is None or calls < n_trials:
                left = None if n_trials is None else n_trials - calls
                try:
                    super().optimize(counted, n_trials=left, **kwargs)
                    break
                except ValueError:
                    if self._lost() is not None or not self._finished_elsewhere(running):
                        raise
                    log.warning("this worker's trial was failed by another worker (its "
                                "heartbeats came too late) and will be run again; going on")
            fail_stale_trials(self)
            self._say_queued_retries()
        except Exception as exc:
            lost = self._lost()
            if lost is not None and not (isinstance(exc, StudyError) and str(exc) == str(lost)):
                raise StudyError(str(lost)) from None
            raise

    def _say_queued_retries(self) -> None:
        """A dead worker's trial re-queued when this run ends is not lost: say so."""
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(TrialState.WAITING,))
        for t in waiting:
            failed = t.system_attrs.get("failed_trial")
            if isinstance(failed, int):
                log.warning("trial %d is queued to run trial %d again (%s); the next "
                            "`autocompress search --study %s` runs it", t.number, failed,
                            STALE_REASON, self.study_name)

    def _lost(self) -> StudyError | None:
        return self.resilient.lost if self.resilient is not None else None

    def _finished_elsewhere(self, running: list[int]) -> bool:
        """Optuna refused to finish this worker's trial: was it finished by someone else
        (another worker's stale-heartbeat check failed it)? Read back from the database,
        not from the error's wording."""
        if not running:
            return False
        trial = next((t for t in self.get_trials(deepcopy=False) if t.number == running[0]),
                     None)
        return trial is not None and trial.state.is_finished()

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
    storage: BaseStorage,
    config: SearchConfig,
    identity: dict[str, Any],
    *,
    seed_offset: int = 0,
    space: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the study once (race-safe across workers) or resume it.

    ``identity`` holds what must match for a resume: model, data, objectives, space hash.
    A mismatch is refused, because a sampler fed trials from another space learns nonsense;
    with ``space`` (``space.space_description``) the refusal names the settings that changed.
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
        stored_space = json.loads(stored.get("search_space") or "null")
        _refuse_mismatch(config, json.loads(stored["identity"]), identity,
                         _space_changes(stored_space, space))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([
                "zip_size_bytes" if o == "size" and config.size_metric == "zip"
                else METRIC_NAMES[o] for o in config.objectives
            ])
        study.set_user_attr("identity", json.dumps(identity, sort_keys=True))
    fail_stale_trials(study)
    return study


def set_study_info(study: optuna.Study, info: dict[str, Any]) -> None:
    """Descriptive attributes (inventory, data, budgets); first writer wins."""
    existing = study.user_attrs
    for key, value in info.items():
        if key not in existing:
            study.set_user_attr(key, value)


def _refuse_mismatch(config: SearchConfig, stored: dict[str, Any], now: dict[str, Any],
                     space_changes: list[str]) -> None:
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
            if key == "space_hash" and space_changes:
                changed = "; ".join(space_changes)
                raise StudyError(
                    f"{where} was searched in another space ({changed}); pass the original "
                    "settings to resume it, or --study NEW_NAME to start a new study"
                )
            raise StudyError(
                f"{where} was made with a different {key.replace('_', ' ')} "
                f"({stored.get(key)!r}, now {now.get(key)!r}); use --study NEW_NAME to start a "
                "new study, or the original settings to resume it"
            )


# What each part of the stored search space is set by, in the user's words.
_SPACE_SETTINGS = {
    "bits": "--bits",
    "activation_bits": "--activation-bits",
    "prune_max": "--prune-max",
    "prune_step": "--prune-step",
    "kd_temperature": "--kd-temperature-min/max",
    "kd_alpha": "--kd-alpha-min/max",
    "finetune_steps": "--finetune-steps",
    "layers": "the model's quantizable layers",
    "groups": "the prunable groups (--prune-max, the model)",
    "sparsity": "--sparsity-scope/max/step",
    "size_metric": "--size-metric",
    "feature_kd": "--feature-weight-max/--feature-layers",
    "ptq_methods": "--ptq-methods",
}


def _space_changes(stored: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """'--bits was [8, 4], now [8]' for each setting of the search space that changed."""
    if not isinstance(stored, dict) or not isinstance(now, dict):
        return []
    out = []
    for key, setting in _SPACE_SETTINGS.items():
        before, after = stored.get(key), now.get(key)
        if before == after:
            continue
        if key in ("layers", "groups"):
            out.append(f"{setting} changed")
        else:  # settings added later are absent while unused
            out.append(f"{setting} was {_plain(before)}, now {_plain(after)}")
    return out


def _plain(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class StorageSnapshot:
    """What existed before a run opened its SQLite storage (see ``no_half_made_study``)."""

    url: str
    study: str
    file_existed: bool
    study_existed: bool
    missing_dirs: tuple[Path, ...]  # folders the run may create, innermost first
    artifacts: Path | None = None  # the artifact folder, when the run would create it


def storage_snapshot(url: str, study_name: str,
                     artifacts: str | None = None) -> StorageSnapshot | None:
    """Take it before the storage is opened (opening creates the file); None for server
    databases, where other workers may be creating the same study right now. ``artifacts``:
    the run's artifact location (a folder is removed again if the run made it, empty)."""
    path = sqlite_path(url)
    if path is None:
        return None
    file_existed = path.exists()
    before = _names_or_none(url) if file_existed else []
    folder = Path(artifacts) if artifacts and "://" not in artifacts else None
    return StorageSnapshot(url, study_name, file_existed,
                           before is None or study_name in before,  # unknown: never delete
                           tuple(_missing_parents(path)),
                           folder if folder is not None and not folder.exists() else None)


@contextlib.contextmanager
def no_half_made_study(snapshot: StorageSnapshot | None) -> Iterator[None]:
    """A run that fails before recording any trial leaves nothing behind: the study it
    created (a bad model, data or budget is found after the study exists) is deleted, and
    the SQLite file it created, with no study left in it, is removed with its lock file and
    the folders made for it. A study that existed before, or recorded a trial, is never
    touched. Enter it while holding the SQLite worker lock (no other writer then)."""
    try:
        yield
    except BaseException:
        if snapshot is not None:
            with contextlib.suppress(Exception):  # clean-up must never hide the real error
                _clean_up(snapshot)
        raise


def _clean_up(snapshot: StorageSnapshot) -> None:
    storage = open_storage(snapshot.url, heartbeat=False, create=False)
    _discard(storage, snapshot.study, snapshot.study_existed)
    if snapshot.artifacts is not None and snapshot.artifacts.is_dir():
        with contextlib.suppress(OSError):  # not empty: files were uploaded, keep them
            snapshot.artifacts.rmdir()
    if snapshot.file_existed or _study_names(storage):
        return
    storage.engine.dispose()
    path = sqlite_path(snapshot.url)
    assert path is not None  # a snapshot is only taken of SQLite storages
    for leftover in (path, path.with_name(path.name + ".lock")):
        leftover.unlink(missing_ok=True)
    for folder in snapshot.missing_dirs:
        folder.rmdir()


def _names_or_none(url: str) -> list[str] | None:
    try:
        return _study_names(open_storage(url, heartbeat=False, create=False))
    except Exception:
        return None


def _study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage,
                                                                 include_best_trial=False)]


def _discard(storage: BaseStorage, study_name: str, existed: bool) -> None:
    if existed or study_name not in _study_names(storage):
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    if not study.get_trials(deepcopy=False):
        optuna.delete_study(study_name=study_name, storage=storage)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, innermost first."""
    out = []
    folder = path.absolute().parent
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=False, create=False)
    names = _study_names(storage)
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


TrialPruned = optuna.TrialPruned
