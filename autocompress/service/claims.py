"""The workers' side of the job store: claims that cannot collide, leases and heartbeats,
releases, and the fair pick across projects (``JobStore`` inherits these; the rules are in
docs/service.md, "The store's interface")."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from autocompress.errors import InputError, one_line
from autocompress.service.store_db import (
    ACTIVE,
    Database,
    Job,
    jobs,
    leases,
    live_counts,
    locked,
    row_job,
)

OUTCOMES = ("paused", "done", "failed", "cancelled")
# PostgreSQL advisory lock taken by claims: concurrent claims each see the leases the others
# wrote, so the fair pick counts them (the row locks alone keep claims from colliding).
_CLAIM_LOCK = 0x61635F636C61696D  # "ac_claim"
# A job whose worker vanished mid-run (a stale lease dropped) this many times fails: the job
# itself likely kills its worker (out of memory), and would take down every worker in turn.
MAX_ATTEMPTS = 3
DIED = (f"the worker running it stopped without a word {MAX_ATTEMPTS} times (out of memory?); "
        "lower its settings and submit again")


class Claims:
    """Claim, heartbeat, release, progress and fair turns (mixed into ``JobStore``)."""

    _db: Database
    stale_after_s: float
    workers_per_job: int

    def claim(self, worker_id: str) -> Job | None:
        """The fair pick among jobs with room for another worker, with a lease for
        ``worker_id`` written in the same transaction; None when nothing is claimable. Drops
        stale leases first: their jobs are claimable again (or cancelled, when asked)."""

        def work(conn: Connection) -> Job | None:
            self._db.serialise(conn, _CLAIM_LOCK)
            now = time.time()
            self._sweep(conn, now)
            counts = self._live_counts(conn, now)
            usage = self._usage(conn, now, counts)
            rows = conn.execute(sa.select(jobs).where(jobs.c.state.in_(ACTIVE),
                                                      jobs.c.cancel_requested.is_(False))).all()
            rows.sort(key=lambda r: (usage.get(r.project, 0), counts.get(r.id, 0),
                                     r.submitted_at, r.id))
            for row in rows:
                if counts.get(row.id, 0) >= self._room(row):
                    continue
                job = self._take(conn, row.id, worker_id, now)
                if job is not None:
                    return job
            return None

        return self._db.run(work, write=True)

    def _take(self, conn: Connection, job_id: str, worker_id: str, now: float) -> Job | None:
        """Lock the job (skipping one another claim holds), check its room again under the
        lock, and write the lease. Every lease of a job is written under its row lock."""
        row = conn.execute(locked(sa.select(jobs).where(
            jobs.c.id == job_id, jobs.c.state.in_(ACTIVE),
            jobs.c.cancel_requested.is_(False)), skip=True)).first()
        if row is None:
            return None
        held = self._live_counts(conn, now, [job_id]).get(job_id, 0)
        if held >= self._room(row):
            return None
        conn.execute(leases.delete().where(leases.c.job_id == job_id,
                                           leases.c.worker_id == worker_id))
        conn.execute(leases.insert().values(job_id=job_id, worker_id=worker_id,
                                            heartbeat_at=now))
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(
            state="running", heartbeat_at=now,
            started_at=sa.func.coalesce(jobs.c.started_at, now)))
        fresh = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
        return row_job(fresh, held + 1)

    def _room(self, row: Row[Any]) -> int:
        """Workers the job may have: the store's limit, and no more than its trials left."""
        return max(1, min(self.workers_per_job, row.trials_target - row.trials_done))

    def _sweep(self, conn: Connection, now: float) -> None:
        """Drop stale leases; a job left with none goes back to ``queued``, or to
        ``cancelled`` when a cancel is pending. Each lease dropped counts an attempt of its
        job; a job at MAX_ATTEMPTS fails."""
        dropped = conn.execute(leases.delete().where(
            leases.c.heartbeat_at < now - self.stale_after_s).returning(leases.c.job_id)).all()
        for job_id in sorted({str(r.job_id) for r in dropped}):
            n = sum(1 for r in dropped if r.job_id == job_id)
            conn.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(attempts=jobs.c.attempts + n))
            conn.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.state.in_(ACTIVE), jobs.c.attempts >= MAX_ATTEMPTS)
                .values(state="failed", finished_at=now, error=DIED))
        orphan = sa.and_(jobs.c.state.in_(ACTIVE),
                         sa.or_(jobs.c.state == "running", jobs.c.cancel_requested.is_(True)),
                         ~sa.exists().where(leases.c.job_id == jobs.c.id))
        for (job_id,) in conn.execute(sa.select(jobs.c.id).where(orphan)).all():
            # Under the row lock, so no claim of this job is half-written meanwhile.
            row = conn.execute(locked(sa.select(jobs).where(jobs.c.id == job_id, orphan),
                                      skip=True)).first()
            if row is not None:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                    **_settled(row, now)))

    def heartbeat(self, worker_id: str, job_id: str) -> bool:
        """Refresh the worker's lease (and the job's ``heartbeat_at``). False when the lease
        is lost: the job ended, or its lease went stale and the job's room was taken by
        another worker; the worker should then stop after its trial, releasing ``paused``."""

        def work(conn: Connection) -> bool:
            now = time.time()
            # others' stale leases are left to the claims' sweep, which counts them
            row = conn.execute(locked(sa.select(jobs).where(jobs.c.id == job_id))).first()
            if row is None or row.state not in ACTIVE:
                return False
            mine = leases.c.job_id == job_id, leases.c.worker_id == worker_id
            fresh = leases.c.heartbeat_at >= now - self.stale_after_s
            kept = conn.execute(leases.update().where(*mine, fresh)
                                .values(heartbeat_at=now)).rowcount
            if not kept:  # stale (the worker stalled): take it back if there is room
                conn.execute(leases.delete().where(*mine))
                if self._live_counts(conn, now, [job_id]).get(job_id, 0) >= self._room(row):
                    return False
                conn.execute(leases.insert().values(job_id=job_id, worker_id=worker_id,
                                                    heartbeat_at=now))
            conn.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(heartbeat_at=now, state="running"))
            return True

        return self._db.run(work, write=True)

    def add_trials(self, job_id: str, n: int = 1) -> None:
        """Count ``n`` more fine-tuned trials finished for the job (the worker calls it after
        each trial, before ``should_yield``; ``release(..., trials=)`` adds the same way)."""
        self._db.run(lambda conn: conn.execute(
            jobs.update().where(jobs.c.id == job_id)
            .values(trials_done=jobs.c.trials_done + int(n))), write=True)

    def release(self, worker_id: str, job_id: str, outcome: str, *, error: str | None = None,
                seconds: float = 0.0, trials: int = 0) -> None:
        """End the worker's lease: ``paused`` puts the job back in the queue once no worker
        is left on it (``cancelled`` if a cancel is pending); ``done``, ``failed`` (with
        ``error``) and ``cancelled`` end the job. ``seconds`` and ``trials`` are added to its
        ``seconds_used`` and ``trials_done``. A job that has already ended keeps its state."""
        if outcome not in OUTCOMES:
            raise InputError(f"release outcome {outcome!r} is unknown; use one of "
                             f"{list(OUTCOMES)}")

        def work(conn: Connection) -> None:
            now = time.time()
            row = conn.execute(locked(sa.select(jobs).where(jobs.c.id == job_id))).first()
            if row is None:
                return
            conn.execute(leases.delete().where(leases.c.job_id == job_id,
                                               leases.c.worker_id == worker_id))
            values: dict[str, Any] = {
                "seconds_used": jobs.c.seconds_used + max(0.0, float(seconds)),
                "trials_done": jobs.c.trials_done + max(0, int(trials))}
            if row.state in ACTIVE:
                if outcome != "paused":
                    values.update(state=outcome, finished_at=now)
                    if outcome == "failed":
                        values["error"] = _reason(error)
                elif not self._live_counts(conn, now, [job_id]):
                    values.update(_settled(row, now))
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))

        self._db.run(work, write=True)

    def should_yield(self, worker_id: str, job_id: str) -> str | None:
        """A reason to stop after this trial when another project's job waits with no worker
        and that project is at least two trials behind this job's (finished and running
        trials); None otherwise. The reason never names the other project."""

        def work(conn: Connection) -> str | None:
            now = time.time()
            mine = conn.execute(sa.select(jobs.c.project).where(jobs.c.id == job_id)).scalar()
            if mine is None:
                return None
            counts = self._live_counts(conn, now)
            usage = self._usage(conn, now, counts)
            waiting = conn.execute(sa.select(jobs.c.id, jobs.c.project).where(
                jobs.c.state.in_(ACTIVE), jobs.c.cancel_requested.is_(False),
                jobs.c.project != mine)).all()
            ours = usage.get(mine, 0)
            behind = [ours - usage.get(p, 0) for i, p in waiting if not counts.get(i, 0)]
            if behind and max(behind) >= 2:
                return (f"another project's turn: its queued job is {max(behind)} trials "
                        "behind this project's; the job pauses here and goes back to the "
                        "queue (finished trials kept)")
            return None

        return self._db.run(work)

    def _usage(self, conn: Connection, now: float, counts: dict[str, int]) -> dict[str, int]:
        """Per project: fine-tuned trials finished and running, over its queued and running
        jobs and those that ended since the oldest of them was submitted (older history does
        not hold a project back forever)."""
        oldest = conn.execute(sa.select(sa.func.min(jobs.c.submitted_at))
                              .where(jobs.c.state.in_(ACTIVE))).scalar()
        counted = jobs.c.state.in_(ACTIVE)
        if oldest is not None:
            counted = sa.or_(counted, jobs.c.finished_at >= oldest)
        usage: dict[str, int] = {}
        for job_id, project, done in conn.execute(
                sa.select(jobs.c.id, jobs.c.project, jobs.c.trials_done).where(counted)):
            usage[project] = usage.get(project, 0) + int(done) + counts.get(job_id, 0)
        return usage

    def _live_counts(self, conn: Connection, now: float,
                     job_ids: Iterable[str] | None = None) -> dict[str, int]:
        return live_counts(conn, now - self.stale_after_s,
                           None if job_ids is None else list(job_ids))


def _settled(row: Row[Any], now: float) -> dict[str, Any]:
    """A job no worker holds any more: back in the queue, or cancelled when asked."""
    if row.cancel_requested:
        return {"state": "cancelled", "finished_at": now}
    return {"state": "queued"}


def _reason(error: str | None) -> str:
    """A job's failure reason as stored: one line, at most 500 characters."""
    return one_line(Exception(error or "the worker reported a failure"), whole=True, limit=500)
