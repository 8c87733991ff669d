"""The compression service end to end: a real PostgreSQL, a real `autocompress serve` process
and 3 `autocompress worker` processes on this machine, tiny demo jobs (digits, 3 trials, 20
fine-tune steps).

- fair share: 3 projects submit 2 jobs each over HTTP at once; all 6 finish; trial numbers
  unique per study; each project's finished trials sampled every second while every project
  still has work queued or running: the largest deviation from a fair third, in trials; wall
  time against the same 6 jobs run one after another by `autocompress search`;
- API latency: 50 clients polling GET /api/v1/jobs/<id> of a running job once a second
  (during the kill and cancel runs below, so the fair-share wall time is not slowed by them);
- a worker SIGKILLed mid-trial: finished trials lost (expect 0), and its job completes;
- cancel: trials that finished after the cancel request (expect <= 1);
- isolation: one project's token on another's jobs (read, events, cancel, export request and
  download, artifact download, job page): every answer 404, with the unknown-id body.

    python benchmarks/service.py --pg-url postgresql://user:pw@127.0.0.1:5432/postgres

The URL (or AUTOCOMPRESS_BENCH_PG_URL / AUTOCOMPRESS_TEST_PG_URL) must name a role that may
CREATE DATABASE: the run gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa
from _common import (
    RESULTS,
    LoadSampler,
    machine_state,
    md_table,
    state_line,
    steal_text,
    text_table,
    write_json,
    write_text,
)
from workers import _fresh_pg

JOB = {"model": "demo", "data": "digits", "trials": 3, "finetune_steps": 20,
       "latency_repeats": 3}
ENV = {"AUTOCOMPRESS_HEARTBEAT_INTERVAL": "2", "AUTOCOMPRESS_GRACE_PERIOD": "6",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROJECTS = ("vision", "audio", "text")
TIMEOUT_S = 600.0


def _cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "autocompress", *args],
                                env={**os.environ, **ENV}, stdout=err, stderr=err)


def _wait(condition: Any, what: str, timeout: float = TIMEOUT_S, every: float = 0.5) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """The processes and a client per project."""

    def __init__(self, url: str, folder: Path) -> None:
        from autocompress.service.store import JobStore

        self.url, self.folder = url, folder
        self.store = JobStore(url)
        self.tokens: dict[str, str] = {}
        for project in PROJECTS:
            self.store.create_project(project)
            self.tokens[project] = self.store.create_token(project, "bench")[1]
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.artifacts = str(folder / "artifacts")
        self.server = _cli("serve", "--storage", url, "--artifacts", self.artifacts,
                           "--port", str(self.port), log=folder / "serve.log")
        self.workers = [self.start_worker() for _ in range(3)]
        _wait(self._up, "the server to answer", 60)
        self.engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))

    def start_worker(self) -> subprocess.Popen[bytes]:
        return _cli("worker", "--storage", self.url, "--artifacts", self.artifacts,
                    "--poll", "0.5", log=self.folder / "workers.log")

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.base}/api/v1/openapi.json", timeout=2).ok
        except requests.RequestException:
            return False

    def call(self, project: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[project]}"}
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.base}{path}", headers=headers, **kwargs)

    def submit(self, project: str, **options: Any) -> str:
        answer = self.call(project, "POST", "/api/v1/jobs", json={**JOB, **options})
        if answer.status_code != 201:
            raise RuntimeError(f"submit refused: {answer.status_code} {answer.text}")
        return str(answer.json()["job"]["id"])

    def job(self, project: str, job_id: str) -> Any:
        return self.store.job(project, job_id)

    def finished_trials(self, study: str) -> dict[int, tuple[str, Any]]:
        """number -> (state, completion time) of the study's finished trials."""
        query = sa.text("SELECT t.number, t.state, t.datetime_complete FROM trials t JOIN "
                        "studies s ON s.study_id = t.study_id WHERE s.study_name = :s AND "
                        "t.state IN ('COMPLETE', 'PRUNED', 'FAIL')")
        with self.engine.connect() as conn:
            return {int(n): (str(s), c) for n, s, c in conn.execute(query, {"s": study})}

    def duplicate_numbers(self) -> int:
        query = sa.text("SELECT count(*) FROM (SELECT t.study_id, t.number FROM trials t "
                        "GROUP BY t.study_id, t.number HAVING count(*) > 1) d")
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def close(self) -> None:
        for proc in [*self.workers, self.server]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.server]:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.engine.dispose()
        self.store.close()


class Pollers:
    """``clients`` threads, each GET /api/v1/jobs/<id> once a second, latency kept."""

    def __init__(self, service: Service, clients: int) -> None:
        self.service, self.clients = service, clients
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0
        self.threads: list[threading.Thread] = []

    def start(self, project: str, job_id: str) -> None:
        self.threads = [threading.Thread(target=self._poll, args=(project, job_id),
                                         daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()

    def _poll(self, project: str, job_id: str) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                answer = self.service.call(project, "GET", f"/api/v1/jobs/{job_id}")
                ok = answer.status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.latencies.append((time.perf_counter() - started) * 1000)
            else:
                self.errors += 1
            self.stop.wait(max(0.0, 1.0 - (time.perf_counter() - started)))

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        ordered = sorted(self.latencies)
        return {"clients": self.clients, "requests": len(ordered), "errors": self.errors,
                "p50_ms": round(statistics.median(ordered), 1) if ordered else None,
                "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 1)
                if ordered else None}


def fair_share(service: Service) -> dict[str, Any]:
    """6 jobs at once from 3 projects; each project's finished trials every second."""
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda p: (p, service.submit(p)), [*PROJECTS, *PROJECTS]))
    deviations: list[float] = []
    with_running: list[float] = []  # the fair pick's own measure: finished + running
    while True:
        jobs = {p: [service.job(q, i) for q, i in ids if q == p] for p in PROJECTS}
        done = {p: sum(j.trials_done for j in js) for p, js in jobs.items()}
        busy = {p: done[p] + sum(j.workers for j in js) for p, js in jobs.items()}
        if all(any(not j.finished for j in js) for js in jobs.values()):
            for counts, out in ((done, deviations), (busy, with_running)):
                fair = sum(counts.values()) / len(PROJECTS)
                out.append(max(abs(d - fair) for d in counts.values()))
        if all(j.finished for js in jobs.values() for j in js):
            break
        if time.monotonic() - started > TIMEOUT_S:
            raise RuntimeError("the six jobs did not finish in time")
        time.sleep(1.0)
    wall = time.monotonic() - started
    final = [service.job(p, i) for p, i in ids]
    return {
        "jobs": [{"id": j.id, "project": j.project, "state": j.state,
                  "trials_done": j.trials_done, "error": j.error} for j in final],
        "all_done": all(j.state == "done" for j in final),
        "wall_s": round(wall, 1),
        "samples": len(deviations),
        "max_deviation_trials": round(max(deviations, default=0.0), 2),
        "max_deviation_finished_and_running": round(max(with_running, default=0.0), 2),
        "mean_deviation_trials": round(statistics.fmean(deviations), 2) if deviations else None,
        "duplicate_trial_numbers": service.duplicate_numbers(),
        "ids": ids,
    }


def _lease_pid(service: Service, job_id: str) -> int | None:
    query = sa.text("SELECT worker_id FROM autocompress_leases WHERE job_id = :j")
    with service.engine.connect() as conn:
        rows = [str(r) for (r,) in conn.execute(query, {"j": job_id})]
    return int(rows[0].rsplit("-", 2)[1]) if rows else None


def kill_mid_trial(service: Service, pollers: Pollers) -> dict[str, Any]:
    job_id = service.submit("vision", trials=6)
    pollers.start("vision", job_id)  # polled until the cancel below is done
    study = f"job-{job_id}"
    query = sa.text("SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name = :s AND t.state = 'RUNNING'")

    def mid_trial() -> bool:
        if service.job("vision", job_id).trials_done < 1:
            return False
        with service.engine.connect() as conn:
            return bool(conn.execute(query, {"s": study}).scalar())

    _wait(mid_trial, "the job to be mid-trial after a finished one", every=0.2)
    pid = _lease_pid(service, job_id)
    victim = next(p for p in service.workers if p.pid == pid)
    kept = service.finished_trials(study)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    service.workers[service.workers.index(victim)] = service.start_worker()
    took = _wait(lambda: service.job("vision", job_id).finished, "the killed job to end")
    after = service.finished_trials(study)
    lost = [n for n, (state, _) in kept.items() if after.get(n, (None,))[0] != state]
    final = service.job("vision", job_id)
    return {"job": job_id, "finished_before_kill": len(kept), "lost": len(lost),
            "state": final.state, "trials_done": final.trials_done,
            "seconds_to_finish_after_kill": round(took, 1)}


def cancel_running(service: Service) -> dict[str, Any]:
    job_id = service.submit("audio", trials=12)
    _wait(lambda: service.job("audio", job_id).trials_done >= 1, "the job's first trial",
          every=0.2)
    sharing = service.job("audio", job_id).workers
    asked = time.time()
    answer = service.call("audio", "POST", f"/api/v1/jobs/{job_id}/cancel")
    took = _wait(lambda: service.job("audio", job_id).finished, "the cancel", every=0.2)
    # every worker on it stops after its trial: wait until the last has let go
    idle = _wait(lambda: _lease_pid(service, job_id) is None, "the workers to let go",
                 every=0.2)
    after = service.finished_trials(f"job-{job_id}")
    late = [n for n, (_, done) in after.items() if done is not None and done.timestamp() > asked]
    final = service.job("audio", job_id)
    return {"job": job_id, "http_status": answer.status_code, "state": final.state,
            "workers_on_job": sharing, "trials_finished_after_cancel": len(late),
            "seconds_to_cancelled": round(took, 1),
            "seconds_to_all_workers_off": round(took + idle, 1),
            "trials_done": final.trials_done}


def isolation(service: Service, ids: list[tuple[str, str]]) -> dict[str, Any]:
    """Every project's token on every other project's jobs, on every route."""
    unknown = service.call("vision", "GET", "/api/v1/jobs/000000000000")
    routes = (("GET", "/api/v1/jobs/{}"), ("GET", "/api/v1/jobs/{}/events"),
              ("POST", "/api/v1/jobs/{}/cancel"), ("POST", "/api/v1/jobs/{}/export"),
              ("GET", "/api/v1/jobs/{}/export"), ("GET", "/api/v1/jobs/{}/artifacts/0/model.onnx"),
              ("GET", "/jobs/{}"))
    answers: list[dict[str, Any]] = []
    for caller in PROJECTS:
        for owner, job_id in ids:
            if owner == caller:
                continue
            for method, path in routes:
                kwargs: dict[str, Any] = {"stream": True, "timeout": 10}
                if method == "POST":
                    kwargs["json"] = {}
                response = service.call(caller, method, path.format(job_id), **kwargs)
                body = response.content[:2000] if response.status_code == 404 else b""
                response.close()
                same = path.startswith("/api") and body.replace(job_id.encode(), b"X") == \
                    unknown.content.replace(b"000000000000", b"X")
                answers.append({"route": f"{method} {path}", "status": response.status_code,
                                "same_body_as_unknown": same})
    return {"requests": len(answers), "404": sum(a["status"] == 404 for a in answers),
            "api_bodies_same_as_unknown": sum(a["same_body_as_unknown"] for a in answers),
            "api_requests": sum(a["route"].split()[1].startswith("/api") for a in answers),
            "other_statuses": sorted({a["status"] for a in answers} - {404})}


def sequential(folder: Path, count: int) -> float:
    """The same jobs one after another by `autocompress search` (one SQLite file each)."""
    started = time.monotonic()
    for i in range(count):
        cmd = [sys.executable, "-m", "autocompress", "search", "--study", f"seq{i}",
               "--storage", f"sqlite:///{folder / f'seq{i}.db'}",
               "--artifacts", str(folder / f"seq{i}-artifacts"), "--trials", str(JOB["trials"]),
               "--finetune-steps", str(JOB["finetune_steps"]),
               "--latency-repeats", str(JOB["latency_repeats"]), "--json"]
        subprocess.run(cmd, env={**os.environ, **ENV}, check=True, capture_output=True,
                       timeout=TIMEOUT_S)
    return time.monotonic() - started


def _report(data: dict[str, Any]) -> tuple[str, list[tuple[str, list[str], list[list[Any]]]]]:
    fair, kill, cancel, iso = data["fair"], data["kill"], data["cancel"], data["isolation"]
    ratio = fair["wall_s"] / data["sequential_s"] if data["sequential_s"] else float("nan")
    poll = data["poll"]
    targets = [
        ["6 jobs from 3 projects all done", f"{sum(j['state'] == 'done' for j in fair['jobs'])}"
         "/6", "MET" if fair["all_done"] else "MISSED"],
        ["trial numbers unique per study", f"{fair['duplicate_trial_numbers']} duplicates",
         "MET" if fair["duplicate_trial_numbers"] == 0 else "MISSED"],
        ["share of finished trials within 1 of fair while all queued",
         f"max deviation {fair['max_deviation_trials']} trials (mean "
         f"{fair['mean_deviation_trials']}) over {fair['samples']} samples; finished + "
         f"running: max {fair['max_deviation_finished_and_running']}",
         "MET" if fair["max_deviation_trials"] <= 1 else "MISSED"],
        ["worker SIGKILLed mid-trial: 0 finished trials lost, job completes",
         f"{kill['lost']} lost of {kill['finished_before_kill']}; job {kill['state']}",
         "MET" if kill["lost"] == 0 and kill["state"] == "done" else "MISSED"],
        ["cancel stops within one trial (per worker on the job)",
         f"{cancel['trials_finished_after_cancel']} trial(s) finished after the request, "
         f"{cancel['workers_on_job']} worker(s) on the job; {cancel['state']} in "
         f"{cancel['seconds_to_cancelled']} s",
         "MET" if cancel["trials_finished_after_cancel"] <= max(1, cancel["workers_on_job"])
         and cancel["state"] == "cancelled" else "MISSED"],
        ["cross-project requests all 404 (>= 30)", f"{iso['404']}/{iso['requests']}",
         "MET" if iso["404"] == iso["requests"] >= 30 else "MISSED"],
    ]
    timing = [
        ["service: 3 workers, 6 jobs submitted at once", f"{fair['wall_s']:.0f}",
         f"{ratio:.2f}x"],
        ["`autocompress search`, the 6 jobs one after another", f"{data['sequential_s']:.0f}",
         "1.00x"],
    ]
    latency = [[poll["clients"], poll["requests"], poll["errors"], poll["p50_ms"],
                poll["p99_ms"]]]
    tables = [
        ("Targets", ["target", "measured", "status"], targets),
        ("Wall time (submit to the last job done)", ["how", "seconds", "vs one after another"],
         timing),
        ("API latency: GET /api/v1/jobs/<id> of the running job, each client once a second "
         "(during the kill and cancel runs)",
         ["clients", "requests", "errors", "p50 ms", "p99 ms"], latency),
    ]
    conditions = (f"{state_line(data['machine'])}. Load average during the run: min "
                  f"{data['load']['min']}, max {data['load']['max']}{steal_text(data['load'])}."
                  f" Jobs: {JOB}; lease and trial heartbeats every "
                  f"{ENV['AUTOCOMPRESS_HEARTBEAT_INTERVAL']} s, grace "
                  f"{ENV['AUTOCOMPRESS_GRACE_PERIOD']} s; one torch/OMP thread per process.")
    return conditions, tables


def _markdown(data: dict[str, Any]) -> str:
    conditions, tables = _report(data)
    iso = data["isolation"]
    parts = ["# The compression service: 3 projects, 3 workers, a real PostgreSQL", "",
             "Generated by `python benchmarks/service.py`: a real `autocompress serve` "
             "process, 3 `autocompress worker` processes and PostgreSQL on this 2-core "
             "machine; every job is submitted over HTTP with a project token.", "",
             f"**Conditions:** {conditions}", ""]
    for title, headers, rows in tables:
        parts += [f"## {title}", "", md_table(headers, rows), ""]
    parts += ["## Isolation", "",
              f"{iso['requests']} requests with one project's token on the other projects' "
              f"jobs (GET job, GET events, POST cancel, POST export, GET export, GET artifact, "
              f"the job page): {iso['404']} answered 404; {iso['api_bodies_same_as_unknown']} "
              f"of the {iso['api_requests']} API answers had the same body as an unknown id "
              f"(the id aside).", "",
              "## Kill and cancel", "",
              f"- killed worker: job {data['kill']['job']} (6 trials) had "
              f"{data['kill']['finished_before_kill']} finished trials when its worker was "
              f"SIGKILLed mid-trial; {data['kill']['lost']} lost; the job ended "
              f"{data['kill']['state']} {data['kill']['seconds_to_finish_after_kill']} s later "
              f"with {data['kill']['trials_done']} trials.",
              f"- cancel: job {data['cancel']['job']} (12 trials) cancelled over HTTP after its "
              f"first trial: {data['cancel']['trials_finished_after_cancel']} trial(s) "
              f"finished after the request ({data['cancel']['workers_on_job']} worker(s) "
              f"shared the job, each stops after the trial it is in), state "
              f"{data['cancel']['state']} after {data['cancel']['seconds_to_cancelled']} s, "
              f"every worker off it after {data['cancel']['seconds_to_all_workers_off']} s, "
              f"{data['cancel']['trials_done']} trials kept.", ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get("AUTOCOMPRESS_BENCH_PG_URL")
                        or os.environ.get("AUTOCOMPRESS_TEST_PG_URL"))
    parser.add_argument("--clients", type=int, default=50, help="API pollers")
    args = parser.parse_args()
    if not args.pg_url:
        parser.error("pass --pg-url (a role that may CREATE DATABASE)")
    load = LoadSampler()
    load.mark("start")
    data: dict[str, Any] = {"machine": machine_state(ort_threads=1, torch_threads=1),
                            "job": JOB, "env": ENV}
    with tempfile.TemporaryDirectory(prefix="ac-bench-service-") as tmp, \
            _fresh_pg(args.pg_url) as url:
        folder = Path(tmp)
        service = Service(url, folder)
        try:
            data["fair"] = fair_share(service)
            load.mark("fair share")
            pollers = Pollers(service, args.clients)
            try:
                data["kill"] = kill_mid_trial(service, pollers)
                data["cancel"] = cancel_running(service)
            finally:
                data["poll"] = pollers.finish()
            load.mark("kill and cancel")
            data["isolation"] = isolation(service, data["fair"].pop("ids"))
        except Exception:
            print((folder / "workers.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            service.close()
        data["sequential_s"] = round(sequential(folder, 6), 1)
        load.mark("sequential")
    data["load"] = load.summary()
    conditions, tables = _report(data)
    print(conditions)
    for title, headers, rows in tables:
        print(f"\n{title}\n{text_table(headers, rows)}")
    write_json(RESULTS / "service.json", data)
    write_text(RESULTS / "service.md", _markdown(data))
    print(f"\nwrote {RESULTS / 'service.md'} and {RESULTS / 'service.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
