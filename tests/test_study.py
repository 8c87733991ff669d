"""The Optuna adapter: settings, heartbeats and retries, lost connections, artifacts, the
SQLite one-worker rule, and race-safe creation on PostgreSQL. No torch here: fast."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import exc as sa_exc

from autocompress import study as study_mod
from autocompress.config.options import SearchConfig
from autocompress.errors import StudyError
from autocompress.study import resilient as study_resilient
from tests.pg import fresh_database

pytestmark = pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize:UserWarning")

IDENTITY = {"model_spec": "demo", "weights_sha256": None, "data_spec": "digits",
            "objectives": ["accuracy", "size"], "space_hash": "h"}
LOST = re.compile(r"^lost the connection to the study database \S+ \(.+\) after \d+ s; the "
                  r"study is consistent: rerun the same command to resume$")


@pytest.fixture
def fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(study_mod.ENV_HEARTBEAT_INTERVAL, "1")
    monkeypatch.setenv(study_mod.ENV_GRACE_PERIOD, "2")
    monkeypatch.setenv(study_mod.ENV_DB_RETRY, "1")


def _config(tmp_path: Path, study: str = "s") -> SearchConfig:
    return SearchConfig(study=study, storage=f"sqlite:///{tmp_path / 'x.db'}")


def _connection_error() -> StorageInternalError:
    """What Optuna raises when the server went away mid-call (driver error as the cause)."""
    import psycopg

    drop = sa_exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
    err = StorageInternalError("An exception is raised during the commit.")
    err.__cause__ = drop
    return err


# -- settings --------------------------------------------------------------------------------


def test_worker_settings_default_and_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (study_mod.ENV_HEARTBEAT_INTERVAL, study_mod.ENV_GRACE_PERIOD,
                 study_mod.ENV_DB_RETRY):
        monkeypatch.delenv(name, raising=False)
    assert study_mod.worker_settings() == study_mod.WorkerSettings(10, 30, 30.0)
    monkeypatch.setenv(study_mod.ENV_HEARTBEAT_INTERVAL, "1")
    monkeypatch.setenv(study_mod.ENV_GRACE_PERIOD, "3")
    monkeypatch.setenv(study_mod.ENV_DB_RETRY, "2.5")
    assert study_mod.worker_settings() == study_mod.WorkerSettings(1, 3, 2.5)


@pytest.mark.parametrize(("name", "value", "words"), [
    ("AUTOCOMPRESS_HEARTBEAT_INTERVAL", "0.5", "positive whole number"),
    ("AUTOCOMPRESS_GRACE_PERIOD", "soon", "positive whole number"),
    ("AUTOCOMPRESS_DB_RETRY_SECONDS", "-1", "positive number"),
    ("AUTOCOMPRESS_GRACE_PERIOD", "5", "must exceed AUTOCOMPRESS_HEARTBEAT_INTERVAL=10"),
])
def test_bad_worker_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(StudyError, match=name) as info:
        study_mod.worker_settings()
    assert words in str(info.value) and "\n" not in str(info.value)


# -- heartbeats ------------------------------------------------------------------------------


def test_storage_retries_stale_trials_once_without_deprecated_api(
    tmp_path: Path, fast_heartbeats: None
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = study_mod.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert storage.backend.heartbeat_interval == 1 and storage.backend.grace_period == 2
    callback = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, RetryHeartbeatStaleTrialCallback)
    assert callback._max_retry == 1
    readers = study_mod.open_storage(f"sqlite:///{tmp_path / 'x.db'}", heartbeat=False)
    assert readers.get_heartbeat_interval() is None


def _start_and_abandon(study: optuna.Study, storage: RDBStorage) -> optuna.Trial:
    """A trial whose worker beat once, then died (nothing finishes it)."""
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    return trial


def test_stale_trial_fails_and_is_queued_once_with_same_params(
    tmp_path: Path, fast_heartbeats: None, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path)
    storage = study_mod.open_storage(config.storage_url())
    study = study_mod.create_or_load_study(storage, config, IDENTITY)
    trial = _start_and_abandon(study, storage)
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("baseline", "fp32")
    trial.set_user_attr("parent_trial", 7)  # what the trial is: kept
    trial.set_user_attr("finetune_steps", 600)
    trial.set_user_attr("accuracy", 0.5)  # half-recorded by the dead worker
    trial.set_user_attr("plan", "{}")
    study._storage.set_trial_system_attr(trial._trial_id, "artifacts:abc", "{}")
    time.sleep(3.2)  # > grace period (SQLite timestamps have 1 s resolution)

    # A worker resuming the study fails the dead worker's trial and queues its retry.
    study = study_mod.create_or_load_study(storage, config, IDENTITY)
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.number == 1
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.params == {"x": x}
    assert retry.user_attrs == {"baseline": "fp32", "parent_trial": 7, "finetune_steps": 600}
    # nothing can be written on the failed trial afterwards: readers say why it failed
    reason = study_mod.records(study)[0].fail_reason
    assert reason is not None and "stopped sending heartbeats" in reason and "#1" in reason
    # a run that ends with the retry still queued says so
    with caplog.at_level(logging.WARNING, logger="autocompress"):
        study.optimize(lambda t: 0.0, n_trials=0)
    assert "trial 1 is queued to run trial 0 again" in caplog.text
    assert not [k for k in retry.system_attrs if k.startswith("artifacts:")]

    # The retry runs with the same parameters; if its worker dies too, no third attempt.
    again = _start_and_abandon(study, storage)
    assert again.number == 1 and again.suggest_float("x", 0.0, 1.0) == x
    time.sleep(3.2)
    study_mod.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.FAIL]


# -- lost connections ------------------------------------------------------------------------


def test_connection_errors_are_recognised() -> None:
    assert study_mod.is_connection_error(_connection_error())
    locked = sa_exc.OperationalError("x", {}, __import__("sqlite3").OperationalError("locked"))
    missing = sa_exc.OperationalError("x", {}, __import__("sqlite3").OperationalError(
        "no such table: trials"))
    assert study_mod.is_connection_error(locked)
    assert not study_mod.is_connection_error(missing)
    assert not study_mod.is_connection_error(ValueError("connection"))


def test_the_resilient_storage_wraps_every_storage_call(tmp_path: Path) -> None:
    """Composition, not patching: every call of Optuna's storage interface is the wrapper's
    own (an Optuna that adds an abstract call makes the wrapper uninstantiable here), and
    Optuna's RDBStorage is left as Optuna wrote it."""
    from optuna.storages import BaseStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    storage = study_mod.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(storage, BaseStorage) and isinstance(storage, BaseHeartbeat)
    assert not isinstance(storage, RDBStorage)
    public = {n for base in (BaseStorage, BaseHeartbeat) for n in dir(base)
              if callable(getattr(base, n)) and (not n.startswith("_") or n in
                                                 BaseHeartbeat.__abstractmethods__)}
    inherited = [n for n in public if getattr(type(storage), n) is getattr(BaseStorage, n, None)
                 or getattr(type(storage), n) is getattr(BaseHeartbeat, n, None)]
    assert not inherited, f"storage calls not wrapped: {inherited}"
    assert all(getattr(RDBStorage, n).__module__.startswith("optuna")
               for n in study_resilient._RETRIED_CALLS if hasattr(RDBStorage, n))


def test_blip_is_retried_and_outage_ends_in_one_line(
    tmp_path: Path, fast_heartbeats: None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = study_mod.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    original = RDBStorage.get_study_user_attrs
    failures = {"left": 2}

    def flaky(self: RDBStorage, sid: int) -> dict:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise _connection_error()
        return original(self, sid)

    monkeypatch.setattr(RDBStorage, "get_study_user_attrs", flaky)
    with caplog.at_level(logging.WARNING, logger="autocompress"):
        assert storage.get_study_user_attrs(study_id) == {}
    assert "lost the connection" in caplog.text and "reconnected" in caplog.text

    def down(self: RDBStorage, *args: object, **kwargs: object) -> None:
        raise _connection_error()

    monkeypatch.setattr(RDBStorage, "get_study_user_attrs", down)
    started = time.monotonic()
    with pytest.raises(StudyError) as info:
        storage.get_study_user_attrs(study_id)
    assert 1.0 <= time.monotonic() - started < 5
    assert LOST.match(str(info.value)), str(info.value)

    # Given up: every later call fails at once, with the same line, even on a healthy call.
    started = time.monotonic()
    with pytest.raises(StudyError, match="lost the connection"):
        storage.get_all_studies()
    assert time.monotonic() - started < 0.5


def test_other_errors_are_not_retried(tmp_path: Path, fast_heartbeats: None) -> None:
    storage = study_mod.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    started = time.monotonic()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("nope")
    assert time.monotonic() - started < 0.5 and storage.lost is None


def test_finish_committed_before_the_drop_counts_as_done(
    tmp_path: Path, fast_heartbeats: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    storage = study_mod.open_storage(config.storage_url())
    study = study_mod.create_or_load_study(storage, config, IDENTITY)
    trial = study.ask()
    original = RDBStorage.set_trial_state_values

    def commit_then_drop(self: RDBStorage, trial_id: int, state: TrialState,
                         values: object = None) -> bool:
        monkeypatch.setattr(RDBStorage, "set_trial_state_values", original)
        original(self, trial_id, state, values)
        raise _connection_error()

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", commit_then_drop)
    study.tell(trial, [0.5, 10.0])
    assert study.get_trials()[0].state == TrialState.COMPLETE


def test_optimize_reports_a_lost_database_as_study_error(
    tmp_path: Path, fast_heartbeats: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    storage = study_mod.open_storage(config.storage_url())
    study = study_mod.create_or_load_study(storage, config, IDENTITY)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        def down(self: RDBStorage, *args: object, **kwargs: object) -> None:
            raise _connection_error()

        for name in ("set_trial_user_attr", "set_trial_state_values", "get_trial",
                     "_get_trials", "record_heartbeat"):
            monkeypatch.setattr(RDBStorage, name, down)
        trial.set_user_attr("accuracy", 1.0)
        return 1.0, 1.0

    # catch=(Exception,) as in the search: Optuna's own clean-up then fails too.
    with pytest.raises(StudyError) as info:
        study.optimize(objective, n_trials=3, catch=(Exception,))
    assert LOST.match(str(info.value)), str(info.value)


def test_worker_overtaken_by_a_stale_check_goes_on(
    tmp_path: Path, fast_heartbeats: None, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path)
    storage = study_mod.open_storage(config.storage_url())
    study = study_mod.create_or_load_study(storage, config, IDENTITY)
    calls: list[int] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        calls.append(trial.number)
        if trial.number == 0:  # another worker decided this one was dead and failed its trial
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            trial.set_user_attr("accuracy", 1.0)  # raises: the trial is finished
        return 1.0, 1.0

    with caplog.at_level(logging.WARNING, logger="autocompress"):
        study.optimize(objective, n_trials=3, catch=(Exception,))
    assert calls == [0, 1, 2]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert "failed by another worker" in caplog.text


# -- SQLite: one worker ----------------------------------------------------------------------


def test_second_sqlite_worker_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with study_mod.single_sqlite_worker(url):
        with pytest.raises(StudyError, match="PostgreSQL") as info:
            with study_mod.single_sqlite_worker(url):
                pass
        assert "\n" not in str(info.value)
    with study_mod.single_sqlite_worker(url):  # released when the first one ends
        pass
    with study_mod.single_sqlite_worker("postgresql://u@h/db"):  # servers: no lock
        pass


# -- artifacts -------------------------------------------------------------------------------


def test_artifact_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = study_mod.artifact_location
    assert loc("s3://bucket/a/b/", "sqlite:///x.db", "s") == "s3://bucket/a/b"
    assert loc(Path("s3://bucket/a"), "sqlite:///x.db", "s") == "s3://bucket/a"  # pathlib form
    assert loc(None, f"sqlite:///{tmp_path}/d/x.db", "s") == str(tmp_path / "d" / "x-artifacts")
    assert loc("shared", "postgresql://h/db", "s") == str(tmp_path / "shared")
    assert loc(None, "postgresql://h/db", "s") == str(tmp_path / "studies" / "s-artifacts")
    with pytest.raises(StudyError, match="bucket"):
        loc("s3://", "sqlite:///x.db", "s")
    store = study_mod.artifact_store(tmp_path / "new" / "folder")
    assert isinstance(store, optuna.artifacts.FileSystemArtifactStore)
    assert (tmp_path / "new" / "folder").is_dir()


def test_s3_without_boto3_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StudyError, match="needs boto3") as info:
        study_mod.artifact_store("s3://bucket/prefix")
    assert "--artifacts PATH" in str(info.value)


def test_s3_artifacts_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="ml-artifacts")
        store = study_mod.artifact_store("s3://ml-artifacts/autocompress/demo")
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'x.db'}")
        trial = study.ask()
        source = tmp_path / "model.onnx"
        source.write_bytes(b"onnx bytes" * 100)
        artifact_id = study_mod.upload(trial, store, source)
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket="ml-artifacts")["Contents"]]
        assert keys == [f"autocompress/demo/{artifact_id}"]
        study_mod.download(store, artifact_id, tmp_path / "back.onnx")
        assert (tmp_path / "back.onnx").read_bytes() == source.read_bytes()
        with pytest.raises(StudyError, match="cannot use artifact bucket 'missing'"):
            study_mod.artifact_store("s3://missing/x")


# -- PostgreSQL: workers starting at the same instant ---------------------------------------

_RACE = """
import sys, time
from pathlib import Path
from autocompress import study as s
from autocompress.config.options import SearchConfig
url, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
config = SearchConfig(study="race", storage=url)
identity = {"model_spec": "demo", "weights_sha256": None, "data_spec": "digits",
            "objectives": ["accuracy", "size"], "space_hash": "h"}
study = s.create_or_load_study(s.open_storage(url), config, identity, seed_offset=int(me))
queued = s.enqueue_baselines(study, [("fp32", {"x": 0.0}), ("int8-ptq", {"x": 1.0})])
print(queued)
"""


def test_three_workers_create_one_study_at_once(tmp_path: Path) -> None:
    with fresh_database() as url:  # empty: the three race on CREATE TABLE (Optuna #4621)
        procs = [
            subprocess.Popen([sys.executable, "-c", _RACE, url, str(tmp_path), str(i + 1)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(3)
        ]
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=120) for p in procs]
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err
        assert sorted(int(out.split()[-1]) for out, _ in results) == [0, 0, 2]
        storage = RDBStorage(url)
        assert [s.study_name for s in storage.get_all_studies()] == ["race"]
        study = optuna.load_study(study_name="race", storage=storage)
        trials = study.get_trials()
        assert sorted(t.user_attrs["baseline"] for t in trials) == ["fp32", "int8-ptq"]
        assert json.loads(study.user_attrs["identity"])["space_hash"] == "h"
        storage.engine.dispose()


def _proposals(sampler: optuna.samplers.BaseSampler, n: int) -> list[dict[str, float]]:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(lambda t: (t.suggest_float("a", 0, 1), t.suggest_float("b", 0, 1)),
                       n_trials=n)
    return [t.params for t in study.trials]


def test_tpe_models_after_its_startup_trials() -> None:
    """TPE's start-up draws equal the seeded random sampler's; after ``startup_trials`` it
    proposes its own. (With Optuna's fixed 8-10, a 4-trial search never left start-up and a
    TPE-vs-random benchmark compared random with random.)"""
    random = _proposals(study_mod.make_sampler("random", 0), 5)
    early = _proposals(study_mod.make_sampler("tpe", 0, startup_trials=2), 5)
    late = _proposals(study_mod.make_sampler("tpe", 0, startup_trials=10), 5)
    assert late == random
    assert early[:2] == random[:2] and early[2:] != random[2:]


def test_postgres_url_names_the_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare postgresql:// means psycopg2 under SQLAlchemy 2.0, which the postgres extra
    does not install: the URL must name the driver that is there, whichever SQLAlchemy is."""
    import importlib.util

    from autocompress.study import driver_url

    url = "postgresql://u:pw@db:5432/studies"
    assert driver_url(url) == "postgresql+psycopg://u:pw@db:5432/studies"  # dev installs psycopg
    assert driver_url("postgres://u@db/s") == "postgresql+psycopg://u@db/s"
    assert driver_url("postgresql+psycopg2://u@db/s") == "postgresql+psycopg2://u@db/s"
    assert driver_url("sqlite:///studies/demo.db") == "sqlite:///studies/demo.db"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg" else real(name, *a))
    if real("psycopg2") is None:
        with pytest.raises(StudyError, match=r"pip install 'autocompress\[postgres\]'") as err:
            driver_url(url)
        assert "pw" not in str(err.value)  # the password is masked
