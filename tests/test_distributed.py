"""Scale-out and fault tolerance with real `autocompress search` processes on the digits demo.

Several workers on one PostgreSQL study, a worker killed mid-trial, the database stopped
mid-search, and the SQLite one-worker rule. Each worker is `python -m autocompress.cli search`
with tiny settings and 1 s heartbeats / 3 s grace period. Marked ``distributed``
(``pytest -m "not distributed"`` leaves them out).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tests.pg import fresh_database, private_server, wait_until

pytestmark = pytest.mark.distributed

TIMEOUT = 420  # seconds for one worker on a loaded 2-core machine
TINY = ("--finetune-steps", "20", "--latency-repeats", "5", "--budget", "50ms", "--json")
FAST = {
    "AUTOCOMPRESS_HEARTBEAT_INTERVAL": "1",
    "AUTOCOMPRESS_GRACE_PERIOD": "3",
    # Several workers share two cores: one compute thread each avoids oversubscription.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# The fault tests are about workers, not baselines: two trials fewer each.
NO_BASELINES = ("--no-baselines",)
# ... and about workers, not the study's priors: a given learning rate (no probe) and no guided
# plans save each worker ~15 s of start-up (the three-worker test keeps both).
QUICK_START = ("--no-guided", "--learning-rate", "0.002")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDY_ATTRS = {"model_spec", "data_spec", "budgets", "objectives", "inventory", "data",
               "search_space", "created_by", "identity"}
MEASURED_ATTRS = {
    "accuracy", "test_accuracy", "size_bytes", "zip_size_bytes", "latency_ms",
    "latency_spread_ms", "latency_vs_fp32", "fp32_latency_ms", "runtime", "flops", "params",
    "plan", "plan_summary", "timing", "artifact_id", "artifact_sha256", "constraints",
    "feasible",
}
PRUNED_ATTRS = {"plan", "plan_summary", "timing", "constraints", "feasible", "early_stopped"}
LOST_LINE = re.compile(r"^error: lost the connection to the study database .+ after \d+ s; "
                       r"the study is consistent: rerun the same command to resume$")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    files: tuple[IO[bytes], ...]

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"worker did not finish in {timeout} s; stderr ends:\n{self.tail()}")
        finally:
            for f in self.files:
                f.close()

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-n:])

    def last_line(self) -> str:
        lines = [line for line in self.stderr().splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _start(folder: Path, name: str, storage: str, study: str, trials: int, *flags: str,
           env: dict[str, str] | None = None) -> Worker:
    cmd = [sys.executable, "-m", "autocompress.cli", "search", "--storage", storage,
           "--study", study, "--trials", str(trials), "--artifacts", str(folder / "artifacts"),
           *TINY, *flags]
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    files = (open(out, "wb"), open(err, "wb"))  # closed by Worker.wait
    proc = subprocess.Popen(cmd, cwd=folder, env={**os.environ, **FAST, **(env or {})},
                            stdout=files[0], stderr=files[1])
    return Worker(proc, out, err, files)


class Watch:
    """Reads a study's trials while workers write it. Optuna's storage is opened only once the
    study exists: opening it earlier would race the workers' own schema creation."""

    def __init__(self, url: str, study: str) -> None:
        self.url = url
        self.study = study
        self.engine = sqlalchemy.create_engine(url)
        self.storage: RDBStorage | None = None

    def trials(self) -> list[FrozenTrial]:
        try:
            if self.storage is None:
                with self.engine.connect() as conn:
                    found = conn.execute(sqlalchemy.text(
                        "SELECT 1 FROM studies WHERE study_name = :name"), {"name": self.study})
                    if found.first() is None:
                        return []
                self.storage = RDBStorage(self.url, skip_table_creation=True)
            study_id = self.storage.get_study_id_from_name(self.study)
            return self.storage.get_all_trials(study_id, deepcopy=False)
        except Exception:  # no schema yet, or SQLite busy for a moment
            return []

    def running_with_plan(self) -> int:
        """Trials inside the objective (their plan recorded, so every parameter is chosen)."""
        return sum(t.state == TrialState.RUNNING and "plan" in t.user_attrs
                   for t in self.trials())

    def finished(self) -> int:
        return sum(t.state in FINISHED for t in self.trials())

    def close(self) -> None:
        self.engine.dispose()
        if self.storage is not None:
            self.storage.engine.dispose()


def _load(url: str, study: str) -> tuple[optuna.Study, list[FrozenTrial]]:
    loaded = optuna.load_study(study_name=study, storage=url)
    return loaded, sorted(loaded.get_trials(), key=lambda t: t.number)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_records(trials: Sequence[FrozenTrial], artifacts: Path) -> None:
    """Every finished trial holds its attributes; every COMPLETE trial's artifacts are in the
    store with the recorded sha256 (the database and the store agree)."""
    for t in trials:
        attrs = set(t.user_attrs)
        if t.state == TrialState.COMPLETE and "rejected" not in attrs:
            assert not MEASURED_ATTRS - attrs, f"trial {t.number} lacks {MEASURED_ATTRS - attrs}"
            for id_key, sha_key in (("artifact_id", "artifact_sha256"),
                                    ("torch_artifact_id", "torch_artifact_sha256")):
                path = artifacts / t.user_attrs[id_key]
                assert path.is_file(), f"trial {t.number}: {id_key} missing from the store"
                assert _sha256(path) == t.user_attrs[sha_key], f"trial {t.number}: {sha_key}"
        elif t.state == TrialState.PRUNED:
            assert not PRUNED_ATTRS - attrs, f"trial {t.number} lacks {PRUNED_ATTRS - attrs}"
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    # Waiting: only plans a search queued for later (a resume runs them), never a trial
    # that had started.
    queued = ("baseline", "warm_start", "guided", "parent_trial")
    assert all(any(k in t.user_attrs for k in queued) and t.datetime_start is None
               for t in trials if t.state == TrialState.WAITING)


def _json(worker: Worker) -> dict[str, Any]:
    return json.loads(worker.stdout())


def test_three_workers_share_one_study(tmp_path: Path, demo_task: object) -> None:
    with fresh_database() as url:
        # The same command three times, at the same moment: one of them queues the baselines.
        workers = [_start(tmp_path, f"w{i}", url, "shared", 4) for i in (1, 2, 3)]
        for w in workers:
            assert w.wait() == 0, w.tail()
        # --trials is per worker: 4 each; the one that queued the baselines ran two more.
        assert sorted(_json(w)["new_trials"] for w in workers) == [4, 4, 6]

        study, trials = _load(url, "shared")
        assert [t.number for t in trials] == list(range(14))
        baselines = {t.user_attrs["baseline"]: t for t in trials if "baseline" in t.user_attrs}
        assert set(baselines) == {"fp32", "int8-ptq"}
        assert all(t.state == TrialState.COMPLETE for t in baselines.values())
        search = [t for t in trials if "baseline" not in t.user_attrs]
        assert len(search) == 12 and all(t.state in FINISHED for t in search)
        assert not STUDY_ATTRS - set(study.user_attrs)
        _check_records(trials, tmp_path / "artifacts")

        show = subprocess.run(
            [sys.executable, "-m", "autocompress.cli", "show", "--storage", url,
             "--study", "shared"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert show.returncode == 0, show.stderr
        assert "Pareto front of study 'shared'" in show.stdout


def test_killed_worker_trial_is_failed_and_retried(tmp_path: Path, demo_task: object) -> None:
    with fresh_database() as url:
        # No guided plans: a plan queued for later would take one of the survivor's 3 trials,
        # and whether the dead worker's retry then still fits depends on timing.
        survivor = _start(tmp_path, "survivor", url, "kill", 3, *NO_BASELINES, *QUICK_START)
        victim = _start(tmp_path, "victim", url, "kill", 1, *NO_BASELINES, *QUICK_START)
        watch = Watch(url, "kill")
        try:
            wait_until(lambda: watch.running_with_plan() == 2, TIMEOUT, "both workers mid-trial")
        finally:
            watch.close()
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        assert survivor.wait() == 0, survivor.tail()
        assert _json(survivor)["new_trials"] == 3
        assert "stopped sending heartbeats" in survivor.stderr()

        _, trials = _load(url, "kill")
        if any(t.state == TrialState.WAITING for t in trials):
            # On a loaded machine the dead worker's heartbeat can go stale only after the
            # survivor started its last trial: the retry is then queued when the survivor
            # ends, said so, and the next search of the study runs it (seen under CI load).
            assert "is queued to run trial" in survivor.stderr(), survivor.tail()
            again = _start(tmp_path, "again", url, "kill", 1, *NO_BASELINES, *QUICK_START)
            assert again.wait() == 0, again.tail()
            _, trials = _load(url, "kill")
            assert [t.number for t in trials] == [0, 1, 2, 3, 4]
        else:  # the survivor ran the dead worker's trial again as one of its 3
            assert [t.number for t in trials] == [0, 1, 2, 3]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        assert len(failed) == 1
        dead = failed[0]
        retries = [t for t in trials if "failed_trial" in t.system_attrs]
        assert len(retries) == 1
        retry = retries[0]
        assert retry.system_attrs["failed_trial"] == dead.number < retry.number
        assert retry.params == dead.params and retry.state in FINISHED
        assert retry.user_attrs["plan"] == dead.user_attrs["plan"]
        _check_records(trials, tmp_path / "artifacts")


def test_database_outage_then_resume(tmp_path: Path, demo_task: object) -> None:
    env = {"AUTOCOMPRESS_DB_RETRY_SECONDS": "2"}
    # A server of our own: stopping the shared one would break other tests using it.
    with private_server() as server:
        first = _start(tmp_path, "first", server.url, "outage", 1, *NO_BASELINES, *QUICK_START,
                       env=env)
        watch = Watch(server.url, "outage")
        try:
            wait_until(lambda: watch.running_with_plan() == 1, TIMEOUT, "a trial to start")
        finally:
            watch.close()
        server.stop()
        code = first.wait()
        assert code not in (0, 130), first.tail()
        assert "Traceback" not in first.stderr()
        assert LOST_LINE.match(first.last_line()), first.tail()
        assert "lost the connection to the study database" in first.stderr()  # the retry note

        server.start()
        again = _start(tmp_path, "again", server.url, "outage", 1, *NO_BASELINES, *QUICK_START,
                       env=env)
        assert again.wait() == 0, again.tail()
        _, trials = _load(server.url, "outage")
        # Numbering continues: the interrupted trial 0 is failed and run again as trial 1.
        assert [t.number for t in trials] == [0, 1]
        assert trials[0].state == TrialState.FAIL
        assert trials[1].state in FINISHED
        assert trials[1].system_attrs["failed_trial"] == 0
        assert trials[1].params == trials[0].params
        _check_records(trials, tmp_path / "artifacts")


def test_sqlite_refuses_a_second_worker_and_sigterm_ends_cleanly(
    tmp_path: Path, demo_task: object
) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    first = _start(tmp_path, "first", url, "one", 50, *NO_BASELINES, *QUICK_START)
    lock = tmp_path / "one.db.lock"
    watch = Watch(url, "one")
    try:
        # The first worker holds the lock (its pid in the file) for the whole search.
        wait_until(lambda: lock.is_file() and lock.read_text() == str(first.proc.pid), TIMEOUT,
                   "the first worker to take the SQLite lock")
        second = _start(tmp_path, "second", url, "one", 50, *NO_BASELINES, *QUICK_START)
        assert second.wait() == 2, second.tail()
        assert "Traceback" not in second.stderr()
        assert re.match(r"^error: another autocompress search is already writing to \S+one\.db;"
                        r" .*PostgreSQL", second.last_line()), second.tail()
        # The first worker goes on: it finishes a trial after the refusal, then starts another.
        done = watch.finished()
        wait_until(lambda: watch.finished() > done and watch.running_with_plan() == 1, TIMEOUT,
                   "the first worker to finish a trial after the refusal and start the next")
    finally:
        watch.close()
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(120) == 130, first.tail()
    assert "interrupted" in first.last_line()
    _, trials = _load(url, "one")
    assert len(trials) >= 2
    ran = [t for t in trials if t.state != TrialState.WAITING]  # queued plans may wait
    assert ran[-1].state == TrialState.FAIL  # the trial SIGTERM interrupted
    assert all(t.state in FINISHED for t in ran[:-1])
    _check_records(trials, tmp_path / "artifacts")
