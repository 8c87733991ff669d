"""Throughput of several search workers on one study, and what coordinating them costs.

Runs real `autocompress search` processes on the digits demo (no baselines, tiny fine-tune)
against SQLite (1 worker) and PostgreSQL (1 and 2 workers), then reads the study:

- trials/h: finished trials per hour of wall time, start of the processes to the last exit;
- steady trials/h: the same between the first trial's start and the last trial's end
  (worker start-up, model loading and the fp32 export left out);
- in-trial overhead: 1 - (seconds in the objective's phases, the ``timing`` attribute) /
  (trial seconds, Optuna's start to complete): sampling, storage writes, heartbeats, tell;
- gap/trial: mean time between a worker's trials (ask, stale-trial check, sampler, callbacks),
  from the steady span x workers minus the trial seconds.

    python benchmarks/workers.py --pg-url postgresql://user:pw@127.0.0.1:5432/postgres

The PostgreSQL URL (or AUTOCOMPRESS_BENCH_PG_URL / AUTOCOMPRESS_TEST_PG_URL) must name a role
that may CREATE DATABASE: every run gets a fresh database, dropped afterwards. Without it only
the SQLite row is measured. The figures depend on the machine's load: run on an idle one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Row:
    storage: str
    workers: int
    trials: int
    wall_s: float
    steady_s: float
    mean_trial_s: float
    in_trial_overhead: float
    gap_s: float

    @property
    def per_hour(self) -> float:
        return self.trials / self.wall_s * 3600

    @property
    def steady_per_hour(self) -> float:
        return self.trials / self.steady_s * 3600 if self.steady_s > 0 else float("nan")


@contextlib.contextmanager
def _fresh_pg(url: str) -> Iterator[str]:
    import psycopg

    name = f"ac_bench_{secrets.token_hex(4)}"
    admin_url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(url: str, workers: int, folder: Path, args: argparse.Namespace) -> Row:
    cmd = [sys.executable, "-m", "autocompress.cli", "search", "--storage", url,
           "--study", "bench", "--trials", str(args.trials), "--no-baselines",
           "--finetune-steps", str(args.finetune_steps), "--latency-repeats", "5",
           "--budget", "50ms", "--artifacts", str(folder / "artifacts"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_worker)}
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed ({proc.returncode}): {err.strip()[-2000:]}")
    wall = time.perf_counter() - started

    study = optuna.load_study(study_name="bench", storage=url)
    done = [t for t in study.get_trials() if t.state in FINISHED]
    trial_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    phase_s = [sum(json.loads(t.user_attrs.get("timing", "{}")).values()) for t in done]
    steady = (max(t.datetime_complete for t in done)
              - min(t.datetime_start for t in done)).total_seconds()
    gaps = max(0.0, steady * workers - sum(trial_s)) / max(1, len(done) - workers)
    return Row(
        storage=url.split(":", 1)[0],
        workers=workers,
        trials=len(done),
        wall_s=wall,
        steady_s=steady,
        mean_trial_s=sum(trial_s) / len(done),
        in_trial_overhead=1 - sum(phase_s) / sum(trial_s),
        gap_s=gaps,
    )


def _table(rows: list[Row]) -> str:
    head = (f"{'storage':<11}{'workers':>8}{'trials':>7}{'wall s':>8}{'trials/h':>10}"
            f"{'steady/h':>10}{'trial s':>9}{'in-trial ovh':>14}{'gap/trial s':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.storage:<11}{r.workers:>8}{r.trials:>7}{r.wall_s:>8.0f}"
                     f"{r.per_hour:>10.0f}{r.steady_per_hour:>10.0f}{r.mean_trial_s:>9.1f}"
                     f"{r.in_trial_overhead:>13.1%}{r.gap_s:>13.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get("AUTOCOMPRESS_BENCH_PG_URL")
                        or os.environ.get("AUTOCOMPRESS_TEST_PG_URL"))
    parser.add_argument("--trials", type=int, default=4, help="search trials per worker")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--workers", default="1,2", help="PostgreSQL worker counts")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    args = parser.parse_args()

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ac-bench-") as tmp:
        # Train and cache the demo teacher once, so no worker pays for it.
        subprocess.run([sys.executable, "-c", "from autocompress.intake import load_task; "
                        "load_task(None, None, None)"], check=True)
        folder = Path(tmp) / "sqlite"
        folder.mkdir()
        rows.append(_run(f"sqlite:///{folder / 'bench.db'}", 1, folder, args))
        print(_table(rows), flush=True)
        if not args.pg_url:
            print("no PostgreSQL URL (--pg-url): only SQLite measured")
            return
        for n in (int(w) for w in args.workers.split(",")):
            folder = Path(tmp) / f"pg{n}"
            folder.mkdir()
            with _fresh_pg(args.pg_url) as url:
                rows.append(_run(url, n, folder, args))
            print(f"\n{_table(rows)}", flush=True)
    print(f"\n{args.trials} trials per worker, --finetune-steps {args.finetune_steps}, "
          f"{args.threads_per_worker} thread(s) per worker, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
