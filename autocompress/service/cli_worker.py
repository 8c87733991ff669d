"""``autocompress worker``: its parser and handler (the loop itself is ``service.worker``)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from typing import Any

from autocompress.errors import InputError

ENV_ARTIFACTS = "AUTOCOMPRESS_SERVICE_ARTIFACTS"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--poll {text!r} must be a positive number of "
                                         "seconds, e.g. --poll 2")
    return value


def add_parsers(sub: Any) -> None:
    """Add ``worker`` to the top-level parser ``sub``."""
    w = sub.add_parser(
        "worker", help="claim queued service jobs and run their searches (several may share "
        "one PostgreSQL database)",
        description="Claim jobs from the service's queue (the study database) and run their "
        "searches, fairly across projects, until stopped. SIGTERM or Ctrl-C stops after the "
        "current trial (the job goes back to the queue, finished trials kept); a second one "
        "stops at once.")
    w.add_argument("--storage", help="the service database, as given to `autocompress serve` "
                   "(default: $AUTOCOMPRESS_SERVICE_DB, else the SQLite default; "
                   "postgresql://user:pw@host/db for several workers)")
    w.add_argument("--artifacts", help="where trial artifacts and uploads live, as given to "
                   f"`serve`: a shared folder or s3://bucket/prefix (default: ${ENV_ARTIFACTS}, "
                   "else the folder beside a SQLite database)")
    w.add_argument("--once", action="store_true", help="exit when no job is left to claim "
                   "(instead of waiting for more)")
    w.add_argument("--poll", type=_seconds, default=2.0, metavar="SECONDS",
                   help="how often an idle worker looks for a job (default 2)")
    w.set_defaults(handler=_worker)


def storage_and_artifacts(storage: str | None, artifacts: str | None) -> tuple[str, str]:
    """The service database URL and artifact location a worker (or server) uses: the flags,
    else the environment, else the SQLite default with its folder beside it."""
    from autocompress.service import store
    from autocompress.study.urls import require_url, sqlite_path

    url = require_url(storage) if storage is not None else (
        os.environ.get(store.ENV_SERVICE_DB) or store.DEFAULT_SERVICE_DB)
    location = artifacts or os.environ.get(ENV_ARTIFACTS)
    if not location:
        path = sqlite_path(url)
        if path is None:
            raise InputError("--artifacts is required with a PostgreSQL --storage: pass the "
                             "shared folder or s3://bucket/prefix that `serve` uses")
        location = str(path.with_name(path.stem + "-artifacts"))
    return url, location


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _stop_gently(stop: threading.Event) -> None:
    """The first SIGTERM/Ctrl-C ends the running job after its trial; a second one at once."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        _say("stopping after the current trial (signal again to stop now)")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _worker(args: argparse.Namespace) -> int:
    from autocompress.service.worker import run_worker

    url, artifacts = storage_and_artifacts(args.storage, args.artifacts)
    stop = threading.Event()
    _stop_gently(stop)
    run_worker(url, artifacts, once=args.once, stop_event=stop, poll_s=args.poll, log=_say)
    return 0
