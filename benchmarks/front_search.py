"""Issue 31's figures: the default proposer against random search on ResNet-20 / CIFAR-10.

    python benchmarks/front_search.py compare      # default vs random, 2 seeds x 15 min, pairs
    python benchmarks/front_search.py budget       # the same under a measured latency budget
    python benchmarks/front_search.py long         # one 40-min default search + a refine
    python benchmarks/front_search.py throughput   # fine-tuned trials/min, before vs after
    python benchmarks/front_search.py compare --minutes 1 --seeds 0 --default-sampler tpe \\
        --out /tmp/fs --cache /tmp/fs-cache        # a smoke run (results kept out of git)

Every search is an ``autocompress search`` process on the shared teacher
(``../shared/models/resnet20-cifar10.pt``, 86.1% test) and the JPEG CIFAR-10 unpacked to
~/.cache/cifar10, default settings except ``--time-limit`` minutes (``--trials`` large, so the
time ends it), ``--seed`` and the thread counts pinned to 1 (``--train-threads 1 --threads
1``, and OMP/MKL at 1). The default arm passes ``--sampler front`` (``--default-sampler``),
the random arm ``--sampler random`` (``--random-flags``): warm starts, guided plans and
promotions are the same in both, so the arms differ in what is proposed after them.

In ``compare`` and ``budget`` both arms of one seed run AT THE SAME TIME, one process per core
of this 2-core machine, so the pair shares the machine's conditions; every latency was then
measured with the other search running on the other core. ``throughput`` runs its two arms
the same way: the code at ``--before-commit`` (from a git worktree, ``--before-tree``) and
this checkout, identical flags, each version's default sampler. ``long`` is alone. Nothing
else should run on the machine meanwhile.

Size ratios are ``results.metrics.times_smaller``: the fp32 baseline file's bytes over the
trial's file bytes. Writes ``<out>/front_search_<mode>.md`` and ``.json`` (``--out``, default
benchmarks/results); studies go under benchmarks/cache/front_search (gitignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _common import (
    MODEL_SPEC,
    REPO,
    RESULTS,
    SINGLE_THREAD_ENV,
    TEACHER,
    LoadSampler,
    machine_state,
    md_table,
    state_line,
    steal_text,
    study_place,
    write_json,
    write_text,
)

from autocompress.config.options import available_cpus  # _common puts the repo on sys.path

CACHE = REPO / "benchmarks" / "cache" / "front_search"  # gitignored
RATIOS = (8.0, 12.0, 16.0)
WITHIN = 0.01  # "within 1 point": of fp32 test accuracy, or of the front (validation)
MAX_REFINE_EPOCHS = 1000  # search.refine.MAX_EPOCHS
TARGET_POINTS = 1.0  # default at least 1 point above random at 12x and 16x, on average
# The published normalisation of the shared teacher (../shared/models/README.md); the
# default (the train split's statistics) is what a user gets and what budgets.py used.
PUBLISHED_MEAN = "0.4914,0.4822,0.4465"
PUBLISHED_STD = "0.2470,0.2435,0.2616"
# trial attributes the lead's proposer adds (autocompress.study.attrs once they land)
PROPOSAL, INHERITED = "proposal", "inherited_from"
FINETUNE_SECONDS = "finetune_seconds"  # the fine-tune's split: data, teacher, step, evaluate
CONCURRENCY = ("Both arms of a seed ran at the same time as two `autocompress search` "
               "processes, one per core of this 2-core machine (1 torch thread and 1 ONNX "
               "Runtime thread each), so the pair shared the machine's conditions; every "
               "latency was measured with the other search running on the other core.")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- running searches ------------------------------------------------------------------------


def _data_spec() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from cifar10 import data as cdata

    log(f"data: {cdata.ensure_cifar()}")
    return f"imagefolder:{cdata.root()}"


def _search_cmd(args: argparse.Namespace, place: dict[str, str], sampler_flags: list[str],
                seed: int, minutes: float, extra: list[str], *,
                one_core: bool = True) -> list[str]:
    """``one_core``: 1 torch thread (two searches share the 2 cores); False: the default
    (fine-tunes on every CPU, for a search alone on the machine)."""
    cmd = [sys.executable, "-m", "autocompress", "search", "--model", MODEL_SPEC,
           "--weights", str(TEACHER), "--data", args.data_spec, "--study", place["study"],
           "--storage", place["storage"], "--artifacts", place["artifacts"],
           "--trials", "10000", "--time-limit", f"{minutes:g}", "--seed", str(seed),
           *(["--train-threads", "1"] if one_core else []), "--threads", "1",
           "--device", "cpu", *sampler_flags, *extra]
    if args.published_stats:
        cmd += ["--mean", PUBLISHED_MEAN, "--std", PUBLISHED_STD]
    return cmd


def _run_processes(jobs: list[dict[str, Any]], limit_s: float, loads: LoadSampler) -> None:
    """Start every job's command at once (output to its log file) and wait for all; each job
    gets ``wall_s`` and ``returncode``. A process still running past ``limit_s`` is stopped
    (SIGTERM: the study keeps its finished trials), then killed. A job may name its own
    ``cwd`` (default the repository) and extra ``env`` variables."""
    started = time.perf_counter()
    for job in jobs:
        extra = job.get("env") or {}
        job["log_file"] = str(job["log"])
        job["handle"] = open(job["log"], "w")  # closed when the process ends
        job["process"] = subprocess.Popen(job["cmd"], cwd=job.get("cwd", REPO),
                                          env={**os.environ, **SINGLE_THREAD_ENV, **extra},
                                          text=True, stdout=job["handle"],
                                          stderr=subprocess.STDOUT)
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
        log(f"   started {job['label']}: {prefix}{shlex.join(job['cmd'][1:])}"
            + (f" (in {job['cwd']})" if job.get("cwd") else ""))
    next_mark = 30.0
    while any(job["process"].poll() is None for job in jobs):
        elapsed = time.perf_counter() - started
        for job in jobs:
            if job["process"].poll() is not None and "wall_s" not in job:
                job["wall_s"] = elapsed
        if elapsed >= next_mark:
            loads.mark(f"+{elapsed:.0f} s")
            next_mark += 30.0
        if elapsed > limit_s:
            for job in jobs:
                if job["process"].poll() is None:
                    log(f"   {job['label']} ran past {limit_s:.0f} s: stopping it")
                    job["process"].terminate()
                    job["stopped"] = True
            try:
                for job in jobs:
                    job["process"].wait(timeout=120)
            except subprocess.TimeoutExpired:
                for job in jobs:
                    job["process"].kill()
        time.sleep(2.0)
    for job in jobs:
        job.setdefault("wall_s", time.perf_counter() - started)
        job["returncode"] = job.pop("process").returncode
        job.pop("handle").close()
        if job["returncode"] != 0:
            tail = Path(job["log"]).read_text(errors="replace").splitlines()[-15:]
            log(f"   {job['label']} exited {job['returncode']}:\n      " + "\n      ".join(tail))


def _arm_flags(args: argparse.Namespace, arm: str) -> list[str]:
    if arm == "default":
        return ["--sampler", args.default_sampler]
    return shlex.split(args.random_flags)


def _pairs(args: argparse.Namespace, mode: str, loads: LoadSampler,
           extra: list[str]) -> list[dict[str, Any]]:
    """Both arms of each seed at the same time; returns one summary per search."""
    runs = []
    for seed in args.seeds:
        jobs = []
        for arm in ("default", "random"):
            place = study_place(args.cache, f"{mode}-{arm}-s{seed}")
            jobs.append({"label": f"{arm} seed {seed}", "arm": arm, "seed": seed, **place,
                         "flags": _arm_flags(args, arm), "log": args.cache / f"{mode}-{arm}"
                         f"-s{seed}.log",
                         "cmd": _search_cmd(args, place, _arm_flags(args, arm), seed,
                                            args.minutes, extra)})
        log(f"== seed {seed}: default and random together, {args.minutes:g} min")
        loads.mark(f"seed {seed} start")
        _run_processes(jobs, args.minutes * 60 * 1.5 + 600, loads)
        loads.mark(f"seed {seed} end")
        for job in jobs:
            runs.append(_summarise_run(job))
            log(f"   {job['label']}: {_run_line(runs[-1])}")
    return runs


# -- reading a study -------------------------------------------------------------------------


def _flat(value: Any, prefix: str = "") -> dict[str, float]:
    """A timing JSON (phase -> seconds, possibly nested sub-phases) as flat "a.b" keys."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {prefix[:-1]: float(value)}
    return {}


def _kind(a: dict[str, Any]) -> str:
    if a.get("baseline"):
        return "baseline"
    if a.get("refine_epochs") is not None:
        return "refine"
    if a.get("parent_trial") is not None:
        return "promotion"
    if a.get("warm_start"):
        return "warm start"
    if a.get("guided"):
        return "guided"
    return "proposed"


KNOWN_ATTRS = {"plan", "plan_summary", "timing", "runtime", "weight_types", "constraints",
               "baseline", "warm_start", "guided", "parent_trial", "accuracy", "test_accuracy",
               "size_bytes", "latency_ms", "latency_vs_fp32", "latency_estimate_ms",
               "feasible", "rejected", "rejected_by_model", "fail_reason",
               "finetune_steps_run", PROPOSAL, INHERITED, FINETUNE_SECONDS}


def _row(t: Any, rec: Any, fp32_size: float | None) -> dict[str, Any]:
    from autocompress.results.metrics import times_smaller

    a = t.user_attrs
    timing = a.get("timing")
    duration = ((t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None)
    steps = a.get("finetune_steps_run")
    split = a.get(FINETUNE_SECONDS)
    return {
        "number": t.number, "state": t.state.name, "kind": _kind(a),
        "label": a.get("baseline") or a.get("warm_start") or a.get("guided"),
        "parent_trial": a.get("parent_trial"), "proposal": a.get(PROPOSAL),
        "inherited_from": a.get(INHERITED), "plan": a.get("plan_summary"),
        "measured": rec.measured, "feasible": rec.feasible, "rejected": rec.rejected,
        "rejected_by_model": a.get("rejected_by_model"), "fail_reason": rec.fail_reason,
        "accuracy": rec.accuracy, "test_accuracy": rec.test_accuracy,
        "size_bytes": rec.size_bytes, "times_smaller": times_smaller(fp32_size, rec.size_bytes),
        "latency_ms": rec.latency_ms, "latency_vs_fp32": rec.latency_vs_fp32,
        "latency_estimate_ms": rec.latency_estimate_ms, "finetune_steps_run": steps,
        "fine_tuned": t.state.name in ("COMPLETE", "PRUNED") and bool(steps),
        "timing": _flat(json.loads(timing)) if isinstance(timing, str) else {},
        "finetune_seconds": _flat(json.loads(split)) if isinstance(split, str) else {},
        "duration_s": duration,
        "start": t.datetime_start.isoformat() if t.datetime_start else None,
        "other_attrs": {k: v for k, v in a.items() if k not in KNOWN_ATTRS
                        and isinstance(v, str | int | float | bool) and len(str(v)) < 200},
    }


def read_study(url: str, name: str) -> dict[str, Any]:
    """Plain rows of every trial, the final front and the study's fp32 figures."""
    from autocompress import study as study_mod
    from autocompress.results.pareto import fp32_record, pareto_front

    study = study_mod.load_existing_study(url, name)
    recs = {r.number: r for r in study_mod.records(study)}
    fp32 = fp32_record(recs.values())
    fp32_size = fp32.size_bytes if fp32 else None
    rows = [_row(t, recs[t.number], fp32_size) for t in study.get_trials(deepcopy=False)
            if t.number in recs]
    front = [[r.number, r.size_bytes, r.accuracy] for r in pareto_front(recs.values())]
    stored = study.user_attrs
    return {
        "fp32": None if fp32 is None else {"trial": fp32.number, "val": fp32.accuracy,
                                           "test": fp32.test_accuracy, "size_bytes": fp32_size,
                                           "latency_ms": fp32.latency_ms},
        "budgets": json.loads(stored.get("budgets") or "[]"),
        "config": json.loads(stored.get("config") or "{}"),
        "data_sizes": json.loads(stored.get("data") or "{}").get("sizes"),
        "front": front,
        "trials": rows,
    }


# -- figures ---------------------------------------------------------------------------------


def _front_at(front: list[list[Any]], size: float) -> float | None:
    """The final front's validation accuracy as a step function of size: the best front
    member at this size or smaller (None: nothing on the front is this small)."""
    accs = [acc for _, s, acc in front if s is not None and acc is not None and s <= size]
    return max(accs, default=None)


def _pick(rows: list[dict[str, Any]], at: float, fp32_test: float | None,
          key: str) -> dict[str, Any] | None:
    pool = [r for r in rows if r["measured"] and r["feasible"] and r[key] is not None
            and (r["times_smaller"] or 0) >= at]
    best = max(pool, key=lambda r: (r[key], r["times_smaller"]), default=None)
    if best is None:
        return None
    test = best["test_accuracy"]
    return {"trial": best["number"], "kind": best["kind"], "test": test, "val": best["accuracy"],
            "times_smaller": best["times_smaller"], "plan": best["plan"],
            "points": None if test is None or fp32_test is None else 100 * (test - fp32_test)}


def _post_guided(study: dict[str, Any]) -> dict[str, Any]:
    """The proposed (not baseline, warm start, guided plan, promotion or refine) fine-tuned
    trials and whether each ended within 1 validation point of the final front."""
    out = []
    for r in study["trials"]:
        if r["kind"] != "proposed" or not r["fine_tuned"]:
            continue
        front_acc = _front_at(study["front"], r["size_bytes"]) if r["size_bytes"] else None
        within = bool(r["measured"] and r["accuracy"] is not None
                      and (front_acc is None or r["accuracy"] >= front_acc - WITHIN - 1e-9))
        out.append({"trial": r["number"], "state": r["state"], "proposal": r["proposal"],
                    "inherited_from": r["inherited_from"], "val": r["accuracy"],
                    "times_smaller": r["times_smaller"], "front_val_at_size": front_acc,
                    "within_1pt": within})
    return {"count": len(out), "within": sum(t["within_1pt"] for t in out), "trials": out}


def figures(study: dict[str, Any], wall_s: float) -> dict[str, Any]:
    rows, fp32 = study["trials"], study["fp32"] or {}
    fp32_test = fp32.get("test")
    tuned = [r for r in rows if r["fine_tuned"]]
    close = [r for r in rows if r["measured"] and r["feasible"] and fp32_test is not None
             and r["test_accuracy"] is not None and r["test_accuracy"] >= fp32_test - WITHIN]
    largest = max(close, key=lambda r: (r["times_smaller"] or 0), default=None)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {
        "fp32_test": fp32_test, "fp32_val": fp32.get("val"),
        "best_test_at": {f"{k:g}x": _pick(rows, k, fp32_test, "test_accuracy") for k in RATIOS},
        "val_chosen_at": {f"{k:g}x": _pick(rows, k, fp32_test, "accuracy") for k in RATIOS},
        # the most accurate compressed candidate (under a budget: within it)
        "best_feasible": _pick([r for r in rows if r["label"] != "fp32"], 0.0, fp32_test,
                               "test_accuracy"),
        "largest_ratio_within_1pt_test": None if largest is None else {
            "trial": largest["number"], "times_smaller": largest["times_smaller"],
            "test": largest["test_accuracy"], "kind": largest["kind"], "plan": largest["plan"]},
        "fine_tuned": len(tuned),
        "fine_tuned_per_min": len(tuned) / (wall_s / 60) if wall_s > 0 else None,
        "measured_feasible": sum(r["measured"] and r["feasible"] for r in rows),
        "kinds": kinds,
        "post_guided": _post_guided(study),
        "timing": time_split(rows),
    }


def time_split(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean seconds per fine-tuned trial in each recorded phase, and its share of the
    trials' Optuna durations."""
    tuned = [r for r in rows if r["fine_tuned"] and r["duration_s"]]
    if not tuned:
        return {"trials": 0}
    total = sum(r["duration_s"] for r in tuned)
    phases: dict[str, float] = {}
    for r in tuned:
        for k, v in r["timing"].items():
            phases[k] = phases.get(k, 0.0) + v
    steps = sum(r["finetune_steps_run"] or 0 for r in tuned)
    finetune = phases.get("finetune")
    return {
        "trials": len(tuned),
        "mean_trial_s": total / len(tuned),
        "mean_phase_s": {k: v / len(tuned) for k, v in sorted(phases.items())},
        "phase_share": {k: v / total for k, v in sorted(phases.items())},
        "steps_per_s": steps / finetune if finetune else None,
    }


def _summarise_run(job: dict[str, Any]) -> dict[str, Any]:
    run = {k: job[k] for k in ("arm", "seed", "flags", "wall_s", "returncode", "log_file")}
    run["stopped_past_limit"] = bool(job.get("stopped"))
    try:
        run["study"] = read_study(job["storage"], job["study"])
    except Exception as exc:  # a refused sampler leaves no study: the report says so
        run["study"] = None
        run["error"] = f"{type(exc).__name__}: {exc}"
        return run
    run["figures"] = figures(run["study"], job["wall_s"])
    return run


# -- formatting ------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _acc(pick: dict[str, Any] | None) -> str:
    if pick is None or pick["test"] is None:
        return "-"
    pts = "" if pick["points"] is None else f" ({pick['points']:+.2f})"
    return f"{pick['test']:.4f}{pts} #{pick['trial']} {pick['times_smaller']:.1f}x"


def _run_line(run: dict[str, Any]) -> str:
    if run.get("figures") is None:
        return f"no study ({run.get('error')}); exit {run['returncode']}"
    f = run["figures"]
    return (f"{f['fine_tuned']} fine-tuned ({f['fine_tuned_per_min'] or 0:.2f}/min); best test "
            + ", ".join(f"{k} {_acc(v)}" for k, v in f["best_test_at"].items()))


def _header(data: dict[str, Any], title: str) -> list[str]:
    return [
        f"# {title}", "",
        f"Generated by `{data['command']}`.", "",
        f"**Conditions:** {data['machine']}. At the end: {data['machine_end']}. Load average "
        f"(1 min) during the run {data['load']['min']:.1f}-{data['load']['max']:.1f}"
        f"{steal_text(data['load'])}. Nothing else should run on the machine meanwhile.", "",
        f"Searches: `autocompress search` on ResNet-20 / CIFAR-10 (shared teacher), default "
        f"settings, `--time-limit {data['minutes']:g}`, `--train-threads 1 --threads 1`, "
        f"OMP/MKL at 1 thread; default arm `{' '.join(data['default_flags'])}`, random arm "
        f"`{' '.join(data['random_flags'])}`"
        + ("; published mean/std of the teacher" if data.get("published_stats") else
           "; normalised by the train split's statistics (the default)") + ".", "",
    ]


def _runs_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        f = r.get("figures")
        if f is None:
            rows.append([r["arm"], r["seed"], f"{r['wall_s'] / 60:.1f}",
                         f"failed: {r.get('error')}", *["-"] * 6])
            continue
        pg, big = f["post_guided"], f["largest_ratio_within_1pt_test"]
        rows.append([
            r["arm"], r["seed"], f"{r['wall_s'] / 60:.1f}",
            f"{f['fine_tuned']} ({f['fine_tuned_per_min'] or 0:.2f}/min)",
            _num(f["fp32_test"]), *(_acc(f["best_test_at"][f"{k:g}x"]) for k in RATIOS),
            "-" if big is None else f"{big['times_smaller']:.2f}x ({big['test']:.4f}, "
            f"#{big['trial']} {big['kind']})",
            f"{pg['within']} of {pg['count']}",
        ])
    return md_table(["arm", "seed", "wall min", "fine-tuned (per min)", "fp32 test",
                     "best test >= 8x (pt)", ">= 12x", ">= 16x",
                     "largest ratio within 1 test pt", "proposed within 1 pt of front"], rows)


def _mean_points(runs: list[dict[str, Any]], arm: str, key: str) -> tuple[float | None, int]:
    values = [r["figures"]["best_test_at"][key]["points"] for r in runs
              if r["arm"] == arm and r.get("figures")
              and r["figures"]["best_test_at"][key] is not None
              and r["figures"]["best_test_at"][key]["points"] is not None]
    return (statistics.mean(values) if values else None), len(values)


def _averages(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    seeds = len({r["seed"] for r in runs})
    rows, targets = [], []
    for arm in ("default", "random"):
        cells = []
        for k in RATIOS:
            mean, n = _mean_points(runs, arm, f"{k:g}x")
            cells.append("-" if mean is None else f"{mean:+.2f} pt" + (
                f" ({n} of {seeds} seeds)" if n < seeds else ""))
        rows.append([arm, *cells])
    for k in RATIOS[1:]:
        d, _ = _mean_points(runs, "default", f"{k:g}x")
        b, _ = _mean_points(runs, "random", f"{k:g}x")
        if d is None:
            targets.append(f"default - random at {k:g}x: default has no candidate that small "
                           f"(target >= +{TARGET_POINTS:g} pt): MISSED")
            continue
        diff = d - (b if b is not None else -100.0)
        ok = diff >= TARGET_POINTS
        targets.append(
            f"default - random at {k:g}x: "
            + (f"{diff:+.2f} pt" if b is not None else "random has no candidate that small")
            + f" (target >= +{TARGET_POINTS:g} pt): {'MET' if ok else 'MISSED'}")
    table = md_table(["arm", "mean best test vs fp32 at >= 8x", ">= 12x", ">= 16x"], rows)
    return table, targets


def _post_guided_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in runs:
        if r["arm"] != "default" or not r.get("figures"):
            continue
        pg = r["figures"]["post_guided"]
        lines.append(f"- seed {r['seed']}: {pg['within']} of {pg['count']} within 1 point")
        for t in pg["trials"]:
            front = t["front_val_at_size"]
            lines.append(
                f"  - #{t['trial']} {t['state']} proposal {t['proposal'] or '-'}, inherited "
                f"from {t['inherited_from'] if t['inherited_from'] is not None else '-'}: val "
                f"{_num(t['val'])} at {(t['times_smaller'] or 0):.2f}x, front there "
                f"{_num(front)}: "
                f"{'within' if t['within_1pt'] else 'not within'}")
    return lines


def render_compare(data: dict[str, Any]) -> str:
    runs = data["runs"]
    table, targets = _averages(runs)
    shares = [r["figures"]["post_guided"] for r in runs
              if r["arm"] == "default" and r.get("figures")]
    n, k = sum(s["count"] for s in shares), sum(s["within"] for s in shares)
    lines = _header(data, "Default proposer vs random search at equal wall-clock "
                    "(ResNet-20 / CIFAR-10)")
    lines += [CONCURRENCY, "",
              "Best test accuracy among measured feasible trials at least 8x, 12x and 16x "
              "smaller than the fp32 file (fp32 bytes / trial bytes), in points against the "
              "study's fp32 test accuracy, with the trial and its ratio (chosen on test "
              "accuracy; the JSON also has the pick by validation accuracy, `val_chosen_at`). "
              "A proposed trial is a fine-tuned trial that is not a baseline, warm start, "
              "guided plan, promotion or refine; it is within 1 point of the final front when "
              "its validation accuracy is at least the front's (a step function of size: its "
              "best member at that size or smaller) minus 0.01 (an early-stopped one is not). "
              "Fine-tuned per minute: trials that ran fine-tune steps per minute of the "
              "process's wall time, start-up, sensitivity pass and baselines included.", "",
              _runs_table(runs), "", "Average over seeds:", "", table, "", "## Targets", "",
              *(f"- {t}" for t in targets),
              f"- default's proposed trials within 1 point of the final front: {k} of {n}"
              + (f" ({k / n:.0%})" if n else ""), "",
              "## Default's proposed trials", "", *_post_guided_lines(runs), ""]
    return "\n".join(lines)


def render_budget(data: dict[str, Any]) -> str:
    p = data["probe"]
    lines = _header(data, "Default proposer vs random search under a latency budget "
                    "(ResNet-20 / CIFAR-10)")
    probes = "; ".join(f"{c['plan'][:50]} {c['ratio']:.3f}x ({c['latency_ms']:.4f} ms)"
                       for c in p["fastest_candidates"])
    lines += [
        f"Budget: `--budget {data['budget']}`, midway between the int8 PTQ baseline "
        f"({p['ptq_ratio']:.3f}x fp32, {p['ptq_ms']:.4f} ms) and the fastest structure the "
        f"space builds ({p['fastest_ratio']:.3f}x, {p['fastest_plan'][:60]}), both pre-checked "
        f"by the package (export + interleaved timing against the fp32 file, careful) in one "
        f"session alone on this machine before the searches (fp32 reference "
        f"{p['reference_ms']:.4f} ms; every prunable group at the space's highest ratio "
        f"{p['prune_high']:g}, each width: {probes}). Each study resolves the ratio against "
        "its own fp32 reference.", "", CONCURRENCY, ""]
    rows, targets = [], []
    for seed in sorted({r["seed"] for r in data["runs"]}):
        best = {}
        for r in data["runs"]:
            if r["seed"] != seed:
                continue
            f = r.get("figures")
            best[r["arm"]] = None if f is None else f["best_feasible"]
            ms = [b["value"] for b in (r["study"] or {}).get("budgets", [])
                  if b.get("kind") == "latency"]
            rows.append([r["arm"], seed, f"{r['wall_s'] / 60:.1f}",
                         "-" if not ms else f"{ms[0]:.4f}",
                         "-" if f is None else f"{f['fine_tuned']}",
                         "-" if f is None else f["measured_feasible"],
                         _acc(best[r["arm"]])])
        d, b = best.get("default"), best.get("random")
        ok = d is not None and (b is None or (d["test"] or 0) >= (b["test"] or 0))
        targets.append(f"seed {seed}: default {_acc(d)} vs random {_acc(b)}: "
                       f"{'MET' if ok else 'MISSED'} (default >= random)")
    lines += [md_table(["arm", "seed", "wall min", "budget ms (study)", "fine-tuned",
                        "measured feasible", "best feasible test (pt vs fp32)"], rows), "",
              "## Targets", "", *(f"- {t}" for t in targets), ""]
    return "\n".join(lines)


def render_long(data: dict[str, Any]) -> str:
    lines = _header(data, f"A {data['minutes']:g}-minute default search and a refine "
                          "(ResNet-20 / CIFAR-10)")
    lines[-2] = (f"Search: `autocompress search` alone on the machine, default settings, "
                 f"`--time-limit {data['minutes']:g}`, `{' '.join(data['default_flags'])}`, "
                 + (f"{data['train_threads']} torch thread(s) (the default: every CPU)"
                    if data.get("train_threads") else "1 torch thread")
                 + " and 1 ONNX Runtime thread (latency).")
    ref = data.get("refine") or {}
    lines += [
        f"Refine: trial {ref.get('parent', '-')} (the most accurate on validation at >= "
        f"{data['refine_at']:g}x) for {ref.get('epochs', '-')} epoch(s) "
        f"({ref.get('steps', '-')} steps; {ref.get('steps_per_s') or 0:.2f} steps/s measured on "
        f"the search's fine-tunes, {data['refine_minutes']:g} min allowed), "
        f"{(ref.get('wall_s') or 0) / 60:.1f} min wall, exit {ref.get('returncode', '-')}"
        + ("" if ref.get("fits", True) else " (one epoch, the least a refine takes, was "
           "estimated to exceed the time allowed)")
        + (f"; refined trial {_acc(ref['trial'])}" if ref.get("trial") else "") + ".", ""]
    rows = []
    for label, f in (("search", data.get("search_figures")), ("after refine",
                                                              data.get("figures"))):
        if f is None:
            continue
        big = f["largest_ratio_within_1pt_test"]
        rows.append([label, _num(f["fp32_test"]), "-" if big is None else
                     f"{big['times_smaller']:.2f}x ({big['test']:.4f}, #{big['trial']} "
                     f"{big['kind']})", *(_acc(f["best_test_at"][f"{k:g}x"]) for k in RATIOS)])
    lines += [md_table(["", "fp32 test", "largest ratio within 1 test pt", "best test >= 8x",
                        ">= 12x", ">= 16x"], rows), ""]
    f = data.get("figures") or {}
    big = f.get("largest_ratio_within_1pt_test")
    ok = big is not None and big["times_smaller"] >= 12
    lines += ["## Targets", "",
              f"- a candidate >= 12x smaller within 1 point of fp32 test: "
              f"{'MET' if ok else 'MISSED'}"
              + ("" if big is None else f" (largest: {big['times_smaller']:.2f}x)"),
              f"- best at >= 16x: {_acc((f.get('best_test_at') or {}).get('16x'))}", ""]
    return "\n".join(lines)


def render_throughput(data: dict[str, Any]) -> str:
    runs = data["runs"]
    lines = ["# Fine-tuned trials per minute, before and after (same settings)", "",
             f"Generated by `{data['command']}`.", "",
             f"**Conditions:** {data['machine']}. At the end: {data['machine_end']}. Load "
             f"average (1 min) during the run {data['load']['min']:.1f}-"
             f"{data['load']['max']:.1f}{steal_text(data['load'])}. Nothing else should run "
             "on the machine meanwhile.", "",
             ("Two `autocompress search` processes one after the other, each alone on the "
              "machine with each version's default fine-tune threads (before: 1; after: every "
              f"CPU, {data.get('cpus', '?')}), OMP/MKL at every CPU, identical flags: "
              "ResNet-20 / CIFAR-10 (shared teacher), "
              f"`--time-limit {data['minutes']:g} --seed {data['seed']} --threads 1`"
              if data.get("alone") else
              "Two `autocompress search` processes started at the same time, one per core of "
              "this 2-core machine, with identical flags: ResNet-20 / CIFAR-10 (shared "
              f"teacher), `--time-limit {data['minutes']:g} --seed {data['seed']} "
              "--train-threads 1 --threads 1`, OMP/MKL at 1 thread")
             + ", each version's own default sampler (no `--sampler`)"
             + ("; published mean/std of the teacher" if data.get("published_stats") else "")
             + f". Before: commit `{data['before_commit']}`, run as `python -m autocompress` "
             f"in its worktree `{data['before_tree']}` with `PYTHONPATH` set to it; after: "
             "this checkout.", ""]
    phases = sorted({k for r in runs for k in r["throughput"]["mean_phase_s"]})
    subs = sorted({k for r in runs for k in r["throughput"]["mean_finetune_seconds"]})
    rows, sub_rows = [], []
    for r in runs:
        t = r["throughput"]
        rows.append([r["arm"], f"`{r['commit'][:12]}`" + (" +" if "uncommitted" in r["commit"]
                                                          else ""),
                     f"{r['wall_s'] / 60:.1f}", t["trials"], t["fine_tuned"],
                     "-" if t["per_min"] is None else f"{t['per_min']:.2f}",
                     "-" if t["mean_trial_s"] is None else f"{t['mean_trial_s']:.1f}",
                     t["inherited"],
                     *(f"{t['mean_phase_s'][p]:.1f}" if p in t["mean_phase_s"] else "-"
                       for p in phases)])
        sub_rows.append([r["arm"], t["finetune_seconds_trials"],
                         *(f"{t['mean_finetune_seconds'][s]:.1f}"
                           if s in t["mean_finetune_seconds"] else "-" for s in subs)])
    ratio = data.get("ratio")
    lines += [md_table(["arm", "commit", "wall min", "trials", "fine-tuned", "per min",
                        "s / trial", "inherited", *(f"{p} s" for p in phases)], rows), "",
              "**After / before, fine-tuned trials per minute: "
              + ("-" if ratio is None else f"{ratio:.2f}x") + "**", "",
              "Fine-tuned: trials whose `timing` attribute has a `finetune` phase; per min: "
              "those per minute of the process's wall time (start-up, sensitivity pass and "
              "baselines included). s / trial: their mean Optuna duration. Phase columns: mean "
              "seconds per fine-tuned trial from `timing` (a phase a trial skipped counts 0). "
              "Inherited: trials with `inherited_from` (started from a parent's weights). "
              "A `+` after the commit: the checkout had uncommitted changes.", ""]
    if subs:
        lines += ["Inside the fine-tune (`finetune_seconds`, mean seconds over the trials that "
                  "recorded it):", "",
                  md_table(["arm", "trials with it", *(f"{s} s" for s in subs)], sub_rows), ""]
    failed = [f"- {r['arm']}: exit {r['returncode']}, {r.get('error') or 'see ' + r['log_file']}"
              for r in runs if r["returncode"] != 0 or r.get("study") is None]
    if failed:
        lines += ["Problems:", "", *failed, ""]
    return "\n".join(lines)


# -- modes -----------------------------------------------------------------------------------


def _common_data(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    return {"command": "python benchmarks/front_search.py " + " ".join(sys.argv[1:]),
            "machine": state_line(state), "machine_state": state, "minutes": args.minutes,
            "seeds": args.seeds, "default_flags": _arm_flags(args, "default"),
            "random_flags": _arm_flags(args, "random"), "published_stats": args.published_stats}


def mode_compare(args: argparse.Namespace, loads: LoadSampler) -> dict[str, Any]:
    return {"runs": _pairs(args, "compare", loads, [])}


def _probe_config(args: argparse.Namespace, place: dict[str, str]) -> Any:
    from autocompress.config.options import SearchConfig

    stats = ({"mean": tuple(map(float, PUBLISHED_MEAN.split(","))),
              "std": tuple(map(float, PUBLISHED_STD.split(",")))} if args.published_stats else {})
    return SearchConfig(model=MODEL_SPEC, weights=str(TEACHER), data=args.data_spec, **place,
                        device="cpu", threads=1, train_threads=1, **stats)


def measure_budget(args: argparse.Namespace) -> dict[str, Any]:
    """The int8 PTQ baseline's and the fastest structure's latency against fp32, pre-checked
    by the package's own machinery (careful, interleaved with the fp32 file) in one session."""
    from autocompress import study as study_mod
    from autocompress.model import space
    from autocompress.search import session as sessions
    from autocompress.transform.student import build_student

    place = study_place(args.cache, "budget-probe")
    config = _probe_config(args, place)
    storage = study_mod.open_storage(place["storage"])
    with tempfile.TemporaryDirectory() as tmp, sessions.torch_threads(1):
        session = sessions.open_session(config, place["storage"], storage, Path(tmp), log)
        task, inventory, settings = session.task, session.inventory, session.settings.space
        acts = settings.activation_bits

        def check(plan: Any, baseline: str | None, name: str) -> dict[str, Any]:
            student = build_student(task, plan, session.settings.training.round_to)
            pre = session.runner.precheck(student, plan, baseline, Path(tmp) / name,
                                          careful=True)
            log(f"   {name}: {pre.ratio:.3f}x fp32 ({pre.latency.median_ms:.4f} ms) "
                f"{plan.summary()[:60]}")
            return {"plan": plan.summary(), "ratio": pre.ratio,
                    "latency_ms": pre.latency.median_ms,
                    "reference_ms": pre.reference.median_ms, "size_bytes": pre.size_bytes}

        ptq = check(space.uniform_plan(inventory, settings, bits=8), "int8-ptq", "int8-ptq")
        high = space.prune_high(settings)
        fastest = [check(space.uniform_plan(
            inventory, settings, bits=bits, ratio=high,
            activation_bits=8 if bits < 32 and 8 in acts else acts[0]), None, f"w{bits}-max")
            for bits in sorted(settings.bits)]
    best = min(fastest, key=lambda c: c["ratio"])
    return {"ptq_ratio": ptq["ratio"], "ptq_ms": ptq["latency_ms"],
            "reference_ms": ptq["reference_ms"], "prune_high": high,
            "fastest_ratio": best["ratio"], "fastest_plan": best["plan"],
            "fastest_candidates": fastest, "ptq": ptq}


def mode_budget(args: argparse.Namespace, loads: LoadSampler) -> dict[str, Any]:
    log("== measuring the int8 PTQ baseline and the fastest structure (alone)")
    probe = measure_budget(args)
    loads.mark("probe done")
    ratio = (probe["ptq_ratio"] + probe["fastest_ratio"]) / 2
    budget = f"{math.floor(ratio * 1000) / 1000:.3f}x"
    log(f"   budget {budget} (midway between {probe['ptq_ratio']:.3f}x and "
        f"{probe['fastest_ratio']:.3f}x)")
    return {"probe": probe, "budget": budget,
            "runs": _pairs(args, "budget", loads, ["--budget", budget])}


def _refine_epochs(study: dict[str, Any], minutes: float) -> dict[str, Any]:
    """Whole epochs that fit ``minutes`` at the search's own fine-tune speed, after the
    time a trial spends outside its fine-tune and two minutes to open the session."""
    split = time_split([r for r in study["trials"] if r["kind"] != "baseline"])
    sps = split.get("steps_per_s") or 1.0
    outside = (split.get("mean_trial_s") or 0.0) - split.get("mean_phase_s", {}).get(
        "finetune", 0.0)
    train = (study["data_sizes"] or {}).get("train") or 45_000
    batch = int(study["config"].get("batch_size") or 128)
    epoch_steps = math.ceil(train / batch)
    spare = minutes * 60 - max(outside, 0.0) - 120.0
    epochs = min(MAX_REFINE_EPOCHS, max(1, math.floor(spare * sps / epoch_steps)))
    return {"epochs": epochs, "steps": epochs * epoch_steps, "steps_per_s": sps,
            "epoch_steps": epoch_steps, "outside_finetune_s": outside,
            "fits": epochs * epoch_steps / sps + outside + 120 <= minutes * 60}


def _every_cpu_env() -> dict[str, str]:
    """OMP/MKL/OpenBLAS at every CPU: for a search alone on the machine."""
    return {k: str(available_cpus()) for k in SINGLE_THREAD_ENV}


def mode_long(args: argparse.Namespace, loads: LoadSampler) -> dict[str, Any]:
    place = study_place(args.cache, f"long-default-s{args.seeds[0]}")
    # alone on the machine: default settings, so the fine-tunes (and the refine, which reads
    # the study's settings) use every CPU; OMP/MKL may too
    every_cpu = _every_cpu_env()
    job = {"label": "default", "arm": "default", "seed": args.seeds[0], **place,
           "flags": _arm_flags(args, "default"), "log": args.cache / f"{place['study']}.log",
           "env": every_cpu,
           "cmd": _search_cmd(args, place, _arm_flags(args, "default"), args.seeds[0],
                              args.minutes, [], one_core=False)}
    log(f"== one default search, {args.minutes:g} min, alone")
    _run_processes([job], args.minutes * 60 * 1.5 + 600, loads)
    run = _summarise_run(job)
    out: dict[str, Any] = {"run": run, "refine_at": args.refine_at,
                           "train_threads": available_cpus(),
                           "refine_minutes": args.refine_minutes,
                           "search_figures": run.get("figures")}
    if run.get("study") is None:
        return out
    pool = [r for r in run["study"]["trials"] if r["measured"] and r["feasible"]
            and (r["times_smaller"] or 0) >= args.refine_at and r["kind"] != "refine"]
    pick = max(pool, key=lambda r: (r["accuracy"] or 0, r["times_smaller"]), default=None)
    if pick is None:
        log(f"   no measured candidate at >= {args.refine_at:g}x: nothing to refine")
        out["figures"] = run["figures"]
        return out
    plan = _refine_epochs(run["study"], args.refine_minutes)
    cmd = [sys.executable, "-m", "autocompress", "refine", "--study", place["study"],
           "--storage", place["storage"], "--artifacts", place["artifacts"],
           "--trial", str(pick["number"]), "--epochs", str(plan["epochs"]), "--json"]
    refine = {"label": "refine", "cmd": cmd, "log": args.cache / f"{place['study']}-refine.log",
              "env": every_cpu}
    log(f"== refine trial {pick['number']} ({pick['times_smaller']:.2f}x, val "
        f"{pick['accuracy']:.4f}) for {plan['epochs']} epoch(s)")
    _run_processes([refine], args.refine_minutes * 60 * 2 + 300, loads)
    out["refine"] = {"parent": pick["number"], **plan, "wall_s": refine["wall_s"],
                     "returncode": refine["returncode"], "log_file": refine["log_file"]}
    out["study_after"] = read_study(place["storage"], place["study"])
    fp32_test = (out["study_after"]["fp32"] or {}).get("test")
    done = [r for r in out["study_after"]["trials"] if r["kind"] == "refine" and r["measured"]]
    out["refine"]["trial"] = None if not done else {
        "trial": done[-1]["number"], "test": done[-1]["test_accuracy"], "val": done[-1]["accuracy"],
        "times_smaller": done[-1]["times_smaller"],
        "points": None if fp32_test is None or done[-1]["test_accuracy"] is None
        else 100 * (done[-1]["test_accuracy"] - fp32_test)}
    out["figures"] = figures(out["study_after"], run["wall_s"] + refine["wall_s"])
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _before_tree(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--before-commit`` checkout the before arm imports its package from: made with
    ``git worktree add`` when ``--before-tree`` does not exist, and refused when it holds
    another commit (a stale tree would measure the wrong code)."""
    tree = args.before_tree.absolute()
    commit = _git("-C", str(REPO), "rev-parse", f"{args.before_commit}^{{commit}}")
    if not tree.exists():
        log(f"== git worktree add -f {tree} {args.before_commit}")
        _git("-C", str(REPO), "worktree", "add", "-f", str(tree), commit)
    held = _git("-C", str(tree), "rev-parse", "HEAD")
    if held != commit:
        raise SystemExit(f"{tree} holds {held[:12]}, not {args.before_commit} ({commit[:12]}): "
                         "remove it (git worktree remove) or pass another --before-tree")
    return {"tree": str(tree), "commit": commit}


def _after_commit() -> str:
    head = _git("-C", str(REPO), "rev-parse", "HEAD")
    # --no-optional-locks: reading the status must not rewrite the shared index
    dirty = _git("--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                 "--untracked-files=no")
    return head + (" + uncommitted changes" if dirty else "")


def _imported_from(env: dict[str, str], cwd: Path) -> str:
    """Where ``python -m autocompress`` with this environment and folder imports the package
    from (the folder comes first on sys.path, so the before arm also runs in its tree)."""
    return subprocess.run([sys.executable, "-c", "import autocompress; "
                           "print(autocompress.__file__)"], cwd=cwd,
                          env={**os.environ, **env}, check=True, capture_output=True,
                          text=True).stdout.strip()


def _means(dicts: list[dict[str, float]], over: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: v / over for k, v in sorted(totals.items())} if over else {}


def _arm_figures(run: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuned trials (their ``timing`` has a ``finetune`` phase) per minute of the
    process's wall time, the mean seconds per phase over them (a phase a trial skipped counts
    0), the mean ``finetune_seconds`` split over the trials that recorded one, and how many
    trials inherited a parent's weights."""
    rows = (run.get("study") or {}).get("trials", [])
    tuned = [r for r in rows if "finetune" in r["timing"]]
    split = [r["finetune_seconds"] for r in tuned if r["finetune_seconds"]]
    durations = [r["duration_s"] for r in tuned if r["duration_s"]]
    wall = run["wall_s"]
    return {"trials": len(rows), "fine_tuned": len(tuned),
            "per_min": len(tuned) / (wall / 60) if wall else None,
            "mean_trial_s": statistics.mean(durations) if durations else None,
            "mean_phase_s": _means([r["timing"] for r in tuned], len(tuned)),
            "finetune_seconds_trials": len(split),
            "mean_finetune_seconds": _means(split, len(split)),
            "inherited": sum(r["inherited_from"] is not None for r in rows)}


def mode_throughput(args: argparse.Namespace, loads: LoadSampler) -> dict[str, Any]:
    before = _before_tree(args)
    seed = args.seeds[0]
    arms = {"before": {"commit": before["commit"], "cwd": Path(before["tree"]),
                       "env": {"PYTHONPATH": before["tree"]}},
            "after": {"commit": _after_commit(), "cwd": REPO, "env": {}}}
    jobs = []
    for arm, where in arms.items():
        where["imported_from"] = _imported_from(where["env"], where["cwd"])
        log(f"   {arm}: {where['commit']}, autocompress from {where['imported_from']}")
        place = study_place(args.cache, f"throughput-{arm}")
        if args.alone:  # each version's own default threads, the machine to itself
            where["env"] = {**where["env"], **_every_cpu_env()}
        jobs.append({"label": arm, "arm": arm, "seed": seed, **place, **where, "flags": [],
                     "log": args.cache / f"throughput-{arm}.log",
                     "cmd": _search_cmd(args, place, [], seed, args.minutes, [],
                                        one_core=not args.alone)})
    for arm, where in arms.items():  # each arm must run its own code, not the other's
        if Path(where["imported_from"]).resolve().parents[1] != where["cwd"].resolve():
            raise SystemExit(f"the {arm} arm would import {where['imported_from']}, "
                             f"not the package in {where['cwd']}")
    loads.mark("start searches")
    if args.alone:
        for job in jobs:
            log(f"== {job['arm']} alone, {args.minutes:g} min, seed {seed}")
            _run_processes([job], args.minutes * 60 * 1.5 + 600, loads)
    else:
        log(f"== before and after together, {args.minutes:g} min, seed {seed}")
        _run_processes(jobs, args.minutes * 60 * 1.5 + 600, loads)
    loads.mark("end searches")
    runs = []
    for job in jobs:
        run = _summarise_run(job)
        run.update(commit=job["commit"], imported_from=job["imported_from"],
                   throughput=_arm_figures(run))
        runs.append(run)
        t = run["throughput"]
        log(f"   {job['label']}: {t['fine_tuned']} fine-tuned in {run['wall_s'] / 60:.1f} min"
            f" = {t['per_min'] or 0:.2f}/min")
    per_min = {r["arm"]: r["throughput"]["per_min"] for r in runs}
    ratio = (per_min["after"] / per_min["before"]
             if per_min["after"] is not None and per_min["before"] else None)
    return {"before_commit": args.before_commit, "before_tree": before["tree"], "seed": seed,
            "runs": runs, "ratio": ratio, "alone": args.alone, "cpus": available_cpus()}


MODES = {"compare": (mode_compare, render_compare), "budget": (mode_budget, render_budget),
         "long": (mode_long, render_long), "throughput": (mode_throughput, render_throughput)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--minutes", type=float, default=None,
                        help="search time limit (default 15; long: 40; throughput: 12)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 (long, throughput: 0)")
    parser.add_argument("--default-sampler", default="front",
                        help="the default arm's --sampler (tpe for smoke runs until front "
                        "lands)")
    parser.add_argument("--random-flags", default="--sampler random",
                        help="the random arm's flags (e.g. add --no-warm-starts --no-guided "
                        "--promote-share 0 for plain random search)")
    parser.add_argument("--refine-minutes", type=float, default=20.0)
    parser.add_argument("--refine-at", type=float, default=12.0,
                        help="long: refine the best (validation) candidate at least this "
                        "many times smaller")
    parser.add_argument("--before-commit", default="dec6391",
                        help="throughput: the commit the before arm runs (default dec6391)")
    parser.add_argument("--before-tree", type=Path, default=Path("/tmp/before"),
                        help="throughput: its git worktree, made with `git worktree add` "
                        "when missing (default /tmp/before)")
    parser.add_argument("--alone", action="store_true",
                        help="throughput: run the arms one after the other, each with its "
                        "version's default threads, instead of together at 1 thread each")
    parser.add_argument("--published-stats", action="store_true",
                        help="pass the teacher's published --mean/--std instead of the "
                        "train split's statistics")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .md/.json go")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the studies go")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md from the saved .json")
    return parser


def main() -> int:
    args = _parser().parse_args()
    defaults = {"long": 40.0, "throughput": 12.0}
    args.minutes = args.minutes or defaults.get(args.mode, 15.0)
    args.seeds = args.seeds or ([0] if args.mode in ("long", "throughput") else [0, 1])
    args.out, args.cache = args.out.absolute(), args.cache.absolute()
    run_mode, render = MODES[args.mode]
    stem = args.out / f"front_search_{args.mode}"
    if args.report_only:
        text = render(json.loads(stem.with_suffix(".json").read_text()))
        write_text(stem.with_suffix(".md"), text)
        print(text)
        return 0
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="optuna")
    import torch

    torch.set_num_threads(1)
    loads = LoadSampler()
    loads.mark("start")
    state = machine_state(ort_threads=1, torch_threads=1)
    log(f"front_search {args.mode}: {state_line(state)}")
    args.data_spec = _data_spec()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = _common_data(args, state)
    data.update(run_mode(args, loads))
    loads.mark("end")
    data["machine_end"] = state_line(machine_state(ort_threads=1, torch_threads=1))
    data["load"] = loads.summary()
    write_json(stem.with_suffix(".json"), data)  # measurements first, report after
    text = render(data)
    write_text(stem.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
