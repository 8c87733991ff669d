"""Following a job live: server-sent events built by polling the job's row and its study.

Events (each ``data:`` is one JSON object):
- ``state``  the job (state, progress, error) whenever it changes; always sent first;
- ``trial``  a trial that finished (complete, failed or pruned), once each, oldest first;
- ``front``  the Pareto front, whenever the set of trials on it changes;
- ``end``    the job reached done / failed / cancelled; the stream closes after it;
- ``error``  the job could not be read (the database gone past its retries), or the token
             was revoked; the stream closes and a client reconnects (finished trials are sent
             again) or, with a revoked token, is refused.
A comment line is sent after 15 s without an event so proxies keep the connection open.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from autocompress.errors import one_line

POLL_S = 0.75
HEARTBEAT_S = 15.0
# The token is checked again every this many polls (~7.5 s, past the token cache's 5 s): a
# revoked token's open stream ends then.
TOKEN_CHECK_POLLS = 10
_TERMINAL = ("done", "failed", "cancelled")
_LOG = logging.getLogger("autocompress.service")


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def event_stream(state: Any, project: str, job: Any, *,
                 token: str | None = None) -> Iterator[str]:
    """The events of one job until it ends (runs after the request returned: it holds only
    plain values and the app's shared state); ``token``: the one the request came with."""
    seen: set[int] = set()
    last_state: tuple[Any, ...] | None = None
    last_front: list[int] | None = None
    last_sent = time.monotonic()
    polls = 0
    yield "retry: 2000\n\n"
    while True:
        polls += 1
        try:  # the store and the reader ride out a brief outage themselves
            if token is not None and polls % TOKEN_CHECK_POLLS == 0 and \
                    state.project_for_token(token) != project:
                yield sse("error", {"error": "the token of this stream was revoked; use a "
                                             "valid project token"})
                return
            job = state.store.job(project, job.id) or job
            snapshot = state.studies.snapshot(job.study)
        except Exception as exc:
            _LOG.warning("events of job %s", job.id, exc_info=exc)
            yield sse("error", {"error": f"cannot read job {job.id}: {one_line(exc)}"})
            return
        out: list[str] = []
        key = (job.state, job.trials_done, round(float(job.seconds_used or 0.0)),
               job.cancel_requested, job.error)
        if key != last_state:
            last_state = key
            out.append(sse("state", _job_event(job)))
        for row in snapshot["trials"]:
            if row["number"] not in seen:
                seen.add(row["number"])
                out.append(sse("trial", row))
        front = [row["number"] for row in snapshot["front"]]
        if front != last_front:
            last_front = front
            out.append(sse("front", {"front": snapshot["front"]}))
        if job.state in _TERMINAL:
            out.append(sse("end", _job_event(job)))
            yield "".join(out)
            return
        if out:
            last_sent = time.monotonic()
            yield "".join(out)
        elif time.monotonic() - last_sent >= HEARTBEAT_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        time.sleep(POLL_S)


def _job_event(job: Any) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "error": job.error,
            "cancel_requested": bool(job.cancel_requested),
            "trials_done": job.trials_done, "trials_target": job.trials_target,
            "seconds_used": round(float(job.seconds_used or 0.0), 1),
            "time_limit_s": job.time_limit_s}


__all__ = ["HEARTBEAT_S", "POLL_S", "event_stream", "sse"]
