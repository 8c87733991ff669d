"""The service's store on real databases (SQLite files and PostgreSQL): hashed tokens,
projects kept apart, claims that never collide (threads and processes), the fair pick, stale
leases, cancels, and the admin commands."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from autocompress.cli import main
from autocompress.errors import InputError, StudyError
from autocompress.service.store import JobStore, hash_token, new_job_id
from tests.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/service.db"
        return
    with fresh_database() as pg_url:
        yield pg_url


def _store(url: str, **kwargs: float) -> JobStore:
    return JobStore(url, **kwargs)  # type: ignore[arg-type]


def _projects(store: JobStore, *names: str) -> None:
    for name in names:
        store.create_project(name)


def test_tokens_are_stored_hashed_and_revoked_tokens_are_unknown(url: str) -> None:
    store = _store(url)
    _projects(store, "alpha")
    token_id, secret = store.create_token("alpha", label="ci")
    assert secret.startswith("ac_") and len(secret) > 40
    assert store.project_for_token(secret) == "alpha"
    assert store.project_for_token(secret + "x") is None
    assert store.project_for_token("") is None
    with store._db.engine.connect() as conn:
        dump = json.dumps([list(map(str, row)) for row in conn.execute(
            sqlalchemy.text("SELECT * FROM autocompress_tokens"))])
    assert secret not in dump and hash_token(secret) in dump
    listed = store.tokens("alpha")
    assert [t["id"] for t in listed] == [token_id] and "sha256" not in listed[0]
    store.revoke_token(token_id)
    assert store.project_for_token(secret) is None
    assert store.tokens()[0]["revoked_at"] is not None
    with pytest.raises(InputError, match="unknown"):
        store.revoke_token("nope")
    with pytest.raises(InputError, match="does not exist"):
        store.create_token("ghost")
    with pytest.raises(InputError, match="already exists"):
        store.create_project("alpha")
    with pytest.raises(InputError, match="invalid"):
        store.create_project("Alpha Team")
    store.close()


def test_another_projects_job_is_none_everywhere(url: str) -> None:
    store = _store(url)
    _projects(store, "alpha", "beta")
    job = store.submit("alpha", {"model": "demo", "trials": 3, "time_limit": 2.5})
    assert (job.state, job.trials_target, job.time_limit_s, job.study) == \
        ("queued", 3, 150.0, f"job-{job.id}")
    assert store.job("beta", job.id) is None
    assert store.cancel("beta", job.id) is None
    assert store.job("alpha", "0123456789ab") is None
    assert store.jobs("beta") == []
    assert store.job("alpha", job.id).state == "queued"  # untouched by beta's cancel
    assert json.loads(json.dumps(store.job("alpha", job.id).to_json()))["spec"]["trials"] == 3
    store.close()


def test_datasets_own_before_shared(url: str) -> None:
    store = _store(url)
    _projects(store, "alpha", "beta")
    assert store.register_dataset("flowers", "imagefolder:/shared/flowers")
    assert store.register_dataset("flowers", "imagefolder:/alpha/flowers", project="alpha")
    assert not store.register_dataset("flowers", "imagefolder:/shared/v2")
    assert store.dataset_spec("flowers", "alpha") == "imagefolder:/alpha/flowers"
    assert store.dataset_spec("flowers", "beta") == "imagefolder:/shared/v2"
    assert store.dataset_spec("tulips", "beta") is None
    assert store.dataset_names("beta") == ["flowers"]
    with pytest.raises(InputError, match="does not exist"):
        store.register_dataset("x", "digits", project="ghost")
    store.close()


def test_cancel_of_a_queued_job_and_of_a_running_one(url: str) -> None:
    store = _store(url)
    _projects(store, "alpha")
    queued = store.submit("alpha", {"trials": 3})
    cancelled = store.cancel("alpha", queued.id)
    assert cancelled is not None and cancelled.state == "cancelled" and cancelled.finished_at
    assert store.claim("w1") is None  # nothing left to claim
    running = store.submit("alpha", {"trials": 3})
    assert store.claim("w1").id == running.id
    flagged = store.cancel("alpha", running.id)
    assert (flagged.state, flagged.cancel_requested, flagged.workers) == ("running", True, 1)
    store.release("w1", running.id, "paused", trials=1, seconds=2.0)
    ended = store.job("alpha", running.id)
    assert (ended.state, ended.trials_done, ended.seconds_used) == ("cancelled", 1, 2.0)
    store.close()


def test_one_job_one_worker_exactly_one_of_8_threads_wins(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/service.db"
    setup = _store(url)
    _projects(setup, "alpha")
    job = setup.submit("alpha", {"trials": 5})
    won: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        store = _store(url)
        barrier.wait()
        got = store.claim(f"w{i}")
        if got is not None:
            won.append(got.id)
        store.close()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == [job.id]
    assert setup.job("alpha", job.id).workers == 1
    setup.close()


def _claim_in_process(url: str, worker: str, queue: multiprocessing.Queue) -> None:
    store = JobStore(url, workers_per_job=1)
    got = []
    while (job := store.claim(worker)) is not None:
        got.append(job.id)
    queue.put(got)
    store.close()


def test_postgresql_claims_from_threads_and_processes_never_collide() -> None:
    with fresh_database() as url:
        setup = _store(url, workers_per_job=1)
        _projects(setup, "alpha", "beta")
        ids = {setup.submit(p, {"trials": 5}).id for p in ("alpha", "beta") for _ in range(6)}
        queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
        procs = [multiprocessing.get_context("spawn").Process(
            target=_claim_in_process, args=(url, f"p{i}", queue)) for i in range(3)]
        for p in procs:
            p.start()
        got: list[str] = []
        lock = threading.Lock()

        def claim(i: int) -> None:
            store = _store(url, workers_per_job=1)
            while (job := store.claim(f"t{i}")) is not None:
                with lock:
                    got.append(job.id)
            store.close()

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in procs:
            got.extend(queue.get(timeout=120))
            p.join(timeout=60)
        assert sorted(got) == sorted(ids)  # every job claimed once, none twice
        setup.close()


def test_postgresql_shares_a_job_up_to_its_limit() -> None:
    with fresh_database() as url:
        store = _store(url, workers_per_job=3)
        _projects(store, "alpha")
        job = store.submit("alpha", {"trials": 2})
        claims = [store.claim(f"w{i}") for i in range(4)]
        # two trials left: two workers share it, not three
        assert [c.id if c else None for c in claims] == [job.id, job.id, None, None]
        store.close()


def test_fair_pick_across_three_projects(tmp_path: Path) -> None:
    store = _store(f"sqlite:///{tmp_path}/service.db")
    _projects(store, "a", "b", "c")
    for project in ("a", "a", "a", "b", "c"):
        store.submit(project, {"trials": 50})
        time.sleep(0.002)
    share: Counter[str] = Counter()
    for _ in range(30):  # one worker, one trial per turn
        job = store.claim("w")
        assert job is not None
        share[job.project] += 1
        store.release("w", job.id, "paused", trials=1)  # the next claim picks again
    assert max(share.values()) - min(share.values()) <= 1, share
    store.close()


def test_should_yield_when_another_project_is_two_trials_behind(url: str) -> None:
    store = _store(url, workers_per_job=1)
    _projects(store, "a", "zulu")
    first = store.submit("a", {"trials": 10})
    job = store.claim("w1")
    assert job.id == first.id
    assert store.should_yield("w1", job.id) is None  # nobody waits
    store.submit("zulu", {"trials": 10})
    assert store.should_yield("w1", job.id) is None  # a: 1 running, zulu: 0
    store.add_trials(job.id, 1)  # a: 1 finished + 1 running, zulu: 0
    reason = store.should_yield("w1", job.id)
    assert reason is not None and "another project's turn" in reason and "zulu" not in reason
    store.release("w1", job.id, "paused")
    assert store.job("a", job.id).state == "queued"
    assert store.claim("w1").project == "zulu"
    store.close()


def test_stale_lease_is_dropped_and_the_job_claimed_again(url: str) -> None:
    store = _store(url, stale_after_s=0.5)
    _projects(store, "alpha")
    job = store.submit("alpha", {"trials": 1})
    assert store.claim("dead").id == job.id
    assert store.claim("alive") is None
    assert store.heartbeat("dead", job.id)
    time.sleep(0.7)  # "dead" stops beating
    assert store.job("alpha", job.id).workers == 0
    taken = store.claim("alive")
    assert taken is not None and taken.id == job.id and taken.workers == 1
    assert not store.heartbeat("dead", job.id)  # its room went to "alive"
    assert store.heartbeat("alive", job.id)
    store.release("alive", job.id, "done", trials=1, seconds=1.5)
    done = store.job("alpha", job.id)
    assert (done.state, done.trials_done, done.finished_at is not None) == ("done", 1, True)
    store.release("dead", job.id, "paused")  # a late release leaves the ended job alone
    assert store.job("alpha", job.id).state == "done"
    store.close()


def test_cancel_pending_on_a_dead_worker_becomes_cancelled_at_the_next_claim(
        tmp_path: Path) -> None:
    store = _store(f"sqlite:///{tmp_path}/service.db", stale_after_s=0.3)
    _projects(store, "alpha")
    job = store.submit("alpha", {"trials": 3})
    store.claim("dead")
    assert store.cancel("alpha", job.id).state == "running"
    time.sleep(0.5)
    assert store.claim("other") is None
    assert store.job("alpha", job.id).state == "cancelled"
    store.close()


def test_failed_release_keeps_a_one_line_reason(tmp_path: Path) -> None:
    store = _store(f"sqlite:///{tmp_path}/service.db")
    _projects(store, "alpha")
    job = store.submit("alpha", {}, job_id=new_job_id())
    assert job.trials_target == 20
    store.claim("w")
    store.release("w", job.id, "failed", error="model cannot load:\n  details\n")
    failed = store.job("alpha", job.id)
    assert failed.state == "failed" and failed.error == "model cannot load: details"
    with pytest.raises(InputError, match="outcome"):
        store.release("w", job.id, "finished")
    store.close()


def test_tables_created_by_racing_processes_and_bad_urls(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    errors: list[BaseException] = []

    def make() -> None:
        try:
            JobStore(url).close()
        except BaseException as exc:  # collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pytest.raises(StudyError, match="cannot open the service database"):
        JobStore("not a url")
    with pytest.raises(StudyError, match=r"u:\*\*\*@127\.0\.0\.1:1/x is unreachable"):
        JobStore("postgresql://u:secret@127.0.0.1:1/x", retry_s=0.3)


def test_admin_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--storage", f"sqlite:///{tmp_path}/svc.db"]
    assert main(["admin", "project", "create", "team-a", *db]) == 0
    assert main(["admin", "project", "create", "team-a", *db]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["admin", "token", "create", "team-a", "--label", "ci", "--json", *db]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["token"].startswith("ac_")
    assert main(["admin", "token", "list", *db]) == 0
    listing = capsys.readouterr().out
    assert made["id"] in listing and "ci" in listing and made["token"] not in listing
    assert main(["admin", "token", "revoke", made["id"], *db]) == 0
    assert JobStore(db[1]).project_for_token(made["token"]) is None
    assert main(["admin", "dataset", "add", "flowers", "imagefolder:/d", "--project", "team-a",
                 *db]) == 0
    capsys.readouterr()
    assert main(["admin", "dataset", "list", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "flowers", "project": "team-a", "data_spec": "imagefolder:/d"}]
    assert main(["admin", "token", "create", "ghost", *db]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_job_whose_worker_dies_three_times_fails(url: str) -> None:
    store = _store(url, stale_after_s=0.2)
    _projects(store, "alpha")
    job = store.submit("alpha", {"trials": 5})
    for n, worker in enumerate(("w1", "w2", "w3")):
        assert store.claim(worker).id == job.id
        assert store.job("alpha", job.id).attempts == n
        time.sleep(0.3)  # the worker dies without a word: its lease goes stale
    assert store.claim("w4") is None  # the sweep dropped the third lease
    failed = store.job("alpha", job.id)
    assert (failed.state, failed.attempts) == ("failed", 3)
    assert "stopped without a word 3 times" in failed.error and "\n" not in failed.error
    store.close()


def test_an_older_jobs_table_gets_the_attempts_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    JobStore(url).close()
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # the table as the first release made it
        conn.exec_driver_sql("ALTER TABLE autocompress_jobs DROP COLUMN attempts")
    engine.dispose()
    store = JobStore(url)
    _projects(store, "alpha")
    job = store.submit("alpha", {"trials": 1})
    assert store.claim("w1").attempts == 0 and store.job("alpha", job.id).attempts == 0
    store.close()
