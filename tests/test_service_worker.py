"""The service's worker with real components: jobs queued in a real SQLite file or a real
PostgreSQL database, real searches of the digits demo (tiny settings), and real
`python -m autocompress worker` processes for the multi-worker and SIGKILL cases (1 s lease
and trial heartbeats, 3 s grace period)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.service import jobspec
from autocompress.service.store import Job, JobStore
from autocompress.service.worker import TARGET_REACHED, _Turn, _Worker, run_worker
from tests.pg import fresh_database, private_server, wait_until

TINY = {"model": "demo", "data": "digits", "trials": 2, "finetune_steps": 10,
        "latency_repeats": 3}
# Faster jobs where the point is the worker, not the study's priors: no baselines, no guided
# plans, a given learning rate (no probe).
QUICK = {**TINY, "baselines": False, "guided": False, "learning_rate": 0.002}
FAST = {"AUTOCOMPRESS_HEARTBEAT_INTERVAL": "1", "AUTOCOMPRESS_GRACE_PERIOD": "3",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
TIMEOUT = 240


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)


def _submit(store: JobStore, project: str, **options: Any) -> Any:
    spec = jobspec.check_submission({**QUICK, **options}, {}, allow_code=False,
                                    dataset_exists=lambda name: False)
    return store.submit(project, spec)


def _trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    except KeyError:  # the study is not made yet
        return []


def _finished(url: str, study: str) -> dict[int, TrialState]:
    return {t.number: t.state for t in _trials(url, study) if t.state in FINISHED}


def _search_trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    """Finished fine-tuned trials: what a job's trial target counts."""
    return [t for t in _trials(url, study) if t.state in FINISHED
            and "baseline" not in t.user_attrs and "rejected" not in t.user_attrs]


def _project(store: JobStore, name: str) -> str:
    store.create_project(name)
    return name


@pytest.fixture
def sqlite_store(tmp_path: Path, fast: None) -> Iterator[tuple[str, JobStore]]:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    store = JobStore(url)
    yield url, store
    store.close()


def test_jobs_run_to_done_and_a_bad_model_fails_with_its_reason(
        sqlite_store: tuple[str, JobStore], tmp_path: Path, demo_task: object) -> None:
    url, store = sqlite_store
    project = _project(store, "vision")
    bad = _submit(store, project, model="torchvision:no_such_net")
    good = store.submit(project, jobspec.check_submission(
        TINY, {}, allow_code=False, dataset_exists=lambda name: False))
    lines: list[str] = []
    handled = run_worker(url, str(tmp_path / "artifacts"), once=True, log=lines.append)
    assert handled == 2, lines

    failed = store.job(project, bad.id)
    assert failed is not None and failed.state == "failed"
    assert failed.error and "no_such_net" in failed.error and "\n" not in failed.error
    assert not failed.error.startswith("internal error"), failed.error

    done = store.job(project, good.id)
    assert done is not None and done.state == "done", (done, lines)
    assert done.trials_done == 2 and done.finished_at is not None
    searched = _search_trials(url, done.study)
    assert len(searched) == 2, [t.user_attrs.get("plan_summary") for t in searched]
    baselines = {t.user_attrs["baseline"] for t in _trials(url, done.study)
                 if "baseline" in t.user_attrs}
    assert baselines == {"fp32", "int8-ptq"}
    assert any(f"job {good.id}" in line and "done" in line for line in lines), lines


def test_cancel_of_a_running_job_stops_it_within_one_trial(
        sqlite_store: tuple[str, JobStore], tmp_path: Path, demo_task: object) -> None:
    url, store = sqlite_store
    project = _project(store, "audio")
    job = _submit(store, project, trials=12)
    stop = threading.Event()
    lines: list[str] = []
    thread = threading.Thread(target=run_worker, args=(url, str(tmp_path / "artifacts")),
                              kwargs={"stop_event": stop, "poll_s": 0.2, "log": lines.append},
                              daemon=True)
    thread.start()
    try:
        wait_until(lambda: store.job(project, job.id).trials_done >= 1, TIMEOUT,
                   "the job's first trial")
        before = len(_finished(url, job.study))
        assert store.cancel(project, job.id).cancel_requested
        wait_until(lambda: store.job(project, job.id).state == "cancelled", TIMEOUT,
                   "the job to be cancelled")
    finally:
        stop.set()
        thread.join(TIMEOUT)
    after = _finished(url, job.study)
    assert len(after) - before <= 1, (before, after)  # the trial running at the cancel
    final = store.job(project, job.id)
    assert final.trials_done < 12 and final.finished_at is not None
    assert not [t for t in _trials(url, job.study) if t.state == TrialState.RUNNING]
    assert not thread.is_alive()


def test_a_second_worker_on_one_sqlite_file_is_refused(
        sqlite_store: tuple[str, JobStore], tmp_path: Path) -> None:
    url, _ = sqlite_store
    stop = threading.Event()
    first = threading.Thread(target=run_worker, args=(url, str(tmp_path / "a")),
                             kwargs={"stop_event": stop, "poll_s": 0.1, "log": lambda _: None})
    first.start()
    try:
        time.sleep(0.5)
        second = _cli(tmp_path, "worker", "--storage", url, "--artifacts", str(tmp_path / "a"),
                      "--once")
        second.wait(TIMEOUT)
        err = second.stderr.read().decode()
        assert second.returncode == 2, err
        assert err.startswith("error: ") and "SQLite serves one worker" in err
        assert "Traceback" not in err
    finally:
        stop.set()
        first.join(TIMEOUT)


def test_bad_worker_flags_are_one_line_errors(tmp_path: Path) -> None:
    for args, words in ((("--poll", "0"), "--poll"),
                        (("--storage", "postgresql://u:p@127.0.0.1:1/x"), "--artifacts")):
        proc = _cli(tmp_path, "worker", *args)
        proc.wait(60)
        err = proc.stderr.read().decode()
        assert proc.returncode == 2 and words in err and len(err.strip().splitlines()) == 1, err


def _cli(folder: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "autocompress", *args], cwd=folder,
                            env={**os.environ, **FAST}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


class _Workers:
    """`autocompress worker` processes, their stderr in files (read when a test fails)."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *flags: str) -> subprocess.Popen[bytes]:
        log = self.folder / f"worker{len(self.procs)}.err"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autocompress", "worker", "--storage", self.url,
                 "--artifacts", str(self.folder / "artifacts"), "--poll", "0.5", *flags],
                cwd=self.folder, env={**os.environ, **FAST}, stdout=subprocess.DEVNULL,
                stderr=err)
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in self.procs)

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish in {TIMEOUT} s:\n{self.logs()}")

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def pg(tmp_path: Path, fast: None) -> Iterator[tuple[str, JobStore, _Workers]]:
    with fresh_database() as url:
        store = JobStore(url)
        workers = _Workers(tmp_path, url)
        try:
            yield url, store, workers
        finally:
            workers.close()
            store.close()


def test_two_worker_processes_share_the_queue_on_postgresql(
        pg: tuple[str, JobStore, _Workers], demo_task: object) -> None:
    url, store, workers = pg
    project = _project(store, "team")
    jobs = [_submit(store, project) for _ in range(3)]
    procs = [workers.start("--once") for _ in range(2)]
    for proc in procs:
        assert workers.wait(proc) == 0, workers.logs()
    for job in jobs:
        final = store.job(project, job.id)
        assert final.state == "done", (final, workers.logs())
        assert final.trials_done >= 2
        numbers = [t.number for t in _trials(url, job.study)]
        assert len(numbers) == len(set(numbers)) and len(_search_trials(url, job.study)) >= 2
    logs = workers.logs()
    assert "Traceback" not in logs, logs


def test_sigterm_ends_after_the_trial_and_sigkill_loses_no_finished_trial(
        pg: tuple[str, JobStore, _Workers], demo_task: object) -> None:
    url, store, workers = pg
    project = _project(store, "nlp")
    job = _submit(store, project, trials=6)

    def mid_trial() -> bool:
        trials = _trials(url, job.study)
        return store.job(project, job.id).trials_done >= 1 and any(
            t.state == TrialState.RUNNING and "plan" in t.user_attrs for t in trials)

    # SIGTERM: the trial in flight finishes (not failed), the job goes back to the queue
    first = workers.start()
    wait_until(mid_trial, TIMEOUT, "the first worker to be mid-trial after a finished one")
    first.send_signal(signal.SIGTERM)
    assert workers.wait(first) == 0, workers.logs()
    paused = store.job(project, job.id)
    assert paused.state == "queued" and paused.trials_done >= 2, (paused, workers.logs())
    assert not [t for t in _trials(url, job.study)
                if t.state in (TrialState.RUNNING, TrialState.FAIL)]

    # SIGKILL: the trial in flight is lost, nothing finished is; another worker completes it
    second = workers.start()
    wait_until(lambda: mid_trial() and store.job(project, job.id).trials_done > (
        paused.trials_done), TIMEOUT, "the second worker to be mid-trial")
    second.send_signal(signal.SIGKILL)
    second.wait(30)
    kept = _finished(url, job.study)
    third = workers.start("--once")
    assert workers.wait(third) == 0, workers.logs()

    final = store.job(project, job.id)
    assert final.state == "done", (final, workers.logs())
    after = _finished(url, job.study)
    assert {n: after.get(n) for n in kept} == kept  # every finished trial still there, as was
    assert len(_search_trials(url, job.study)) >= 6
    retried = [t for t in _trials(url, job.study) if "failed_trial" in t.system_attrs]
    assert len(retried) <= 1


def test_the_database_briefly_gone_is_waited_out(
        fast: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_task: object) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_DB_RETRY_SECONDS", "1")  # the store gives up fast...
    with private_server() as server:
        store = JobStore(server.url)
        project = _project(store, "ops")
        stop = threading.Event()
        lines: list[str] = []
        thread = threading.Thread(target=run_worker, args=(server.url, str(tmp_path / "a")),
                                  kwargs={"stop_event": stop, "poll_s": 0.2,
                                          "log": lines.append}, daemon=True)
        thread.start()
        try:
            server.stop()
            time.sleep(4)  # ...and the worker waits, saying so once
            assert thread.is_alive()
            server.start()
            job = _submit(store, project)
            wait_until(lambda: store.job(project, job.id).finished, TIMEOUT, "the job")
            assert store.job(project, job.id).state == "done", lines
        finally:
            stop.set()
            thread.join(TIMEOUT)
            store.close()
    gone = [line for line in lines if "database unavailable" in line]
    assert len(gone) == 1 and "\n" not in gone[0], lines
    assert any("reachable again" in line for line in lines), lines


class _FakeStore:
    """The store calls a turn makes, in memory: one job, its trial count, its workers."""

    def __init__(self, target: int, done: int = 0) -> None:
        self.row = Job(id="a" * 12, project="p", state="running", spec={}, study="job-a",
                       submitted_at=0.0, started_at=0.0, finished_at=None, error=None,
                       cancel_requested=False, trials_target=target, time_limit_s=None,
                       seconds_used=0.0, trials_done=done, heartbeat_at=None, workers=1)
        self.released: list[tuple[str, bool]] = []

    def heartbeat(self, worker_id: str, job_id: str) -> bool:
        return True

    def job(self, project: str, job_id: str) -> Job:
        return self.row

    def add_trials(self, job_id: str, n: int = 1) -> None:
        self.row = dataclasses.replace(self.row, trials_done=self.row.trials_done + n)

    def should_yield(self, worker_id: str, job_id: str) -> None:
        return None

    def release(self, worker_id: str, job_id: str, outcome: str, **kwargs: Any) -> None:
        beating = any(t.name == "autocompress-lease-heartbeat" and t.is_alive()
                      for t in threading.enumerate())
        self.released.append((outcome, beating))


def _trial(**attrs: Any) -> SimpleNamespace:
    return SimpleNamespace(last=SimpleNamespace(baseline=None, rejected=None, attrs=attrs))


def _turn(store: _FakeStore) -> Any:
    worker = _Worker(store, "sqlite:///x.db", "art", "w1", threading.Event(), lambda _: None)
    return _Turn(worker, store.row)


def test_a_turns_own_last_trial_leaves_the_promotions_to_run() -> None:
    store = _FakeStore(target=3)
    turn = _turn(store)
    for _ in range(3):
        turn.on_progress(_trial())
        assert turn.stop_request() is None  # not TARGET_REACHED: run_search promotes next
    turn.on_progress(_trial(parent_trial=1))  # a promotion: not a search trial
    assert (turn.trials, store.row.trials_done, turn.stop_request()) == (3, 3, None)
    shared = _FakeStore(target=3)
    turn = _turn(shared)
    turn.on_progress(_trial())
    shared.add_trials(shared.row.id, 2)  # another worker's trials reach the target
    assert turn.stop_request() == TARGET_REACHED


def test_an_interrupted_turn_stops_its_heartbeat_before_the_release(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_HEARTBEAT_INTERVAL", "1")

    def interrupted(self: Any, job: Any, turn: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(_Worker, "_run", interrupted)
    store = _FakeStore(target=2)
    with pytest.raises(KeyboardInterrupt):
        _turn(store).worker.handle(store.row)
    assert store.released == [("paused", False)]
