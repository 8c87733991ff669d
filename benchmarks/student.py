"""Issue 34's student figure: a search with ``--student`` against one without, equal wall-clock.

    python benchmarks/student.py --minutes 20 --epochs 15            # the real run (lead)
    python benchmarks/student.py --student autocompress.zoo:resnet20_half --minutes 20
    python benchmarks/student.py --demo --minutes 1.5 --epochs 1 --out /tmp/st  # smoke run

Both arms are ``autocompress search`` processes on the shared ResNet-20 teacher
(``../shared/models/resnet20-cifar10.pt``) and CIFAR-10 (``--demo``: the digits demo CNN and
``tests.student_models:tiny_student``), identical flags (``--time-limit MINUTES``, seed,
1 torch and 1 ONNX Runtime thread, OMP/MKL at 1) except that the student arm adds
``--student SPEC --student-epochs N``. They run AT THE SAME TIME, one per core of this 2-core
machine, so both see the same conditions and the same wall-clock.

Figures per arm, all from the studies (every number measured on the trial's ONNX file):
the student's distillation trial (epochs run, layer pairing, val and test accuracy, size,
latency vs the teacher's fp32), and the front: the largest size ratio (fp32 bytes / trial
bytes) within 1 point of the fp32 baseline's validation accuracy (its test accuracy
reported beside it) and the best validation accuracy at >= 8x, 12x and 16x smaller, with
the base model of each point. Writes ``<out>/student.md`` and ``.json`` (``--out``, default
benchmarks/results); studies under benchmarks/cache/student (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    MODEL_SPEC,
    REPO,
    RESULTS,
    SINGLE_THREAD_ENV,
    TEACHER,
    machine_state,
    md_table,
    state_line,
    study_place,
    write_json,
    write_text,
)

CACHE = REPO / "benchmarks" / "cache" / "student"  # gitignored
RATIOS = (8.0, 12.0, 16.0)
WITHIN = 0.01  # "within 1 point" of the fp32 baseline's validation accuracy
DEMO_STUDENT = "tests.student_models:tiny_student"


def log(text: str) -> None:
    print(text, flush=True)


def _task_flags(args: argparse.Namespace) -> list[str]:
    if args.demo:
        return []
    sys.path.insert(0, str(Path(__file__).parent))
    from cifar10 import data as cdata

    log(f"data: {cdata.ensure_cifar()}")
    return ["--model", MODEL_SPEC, "--weights", str(TEACHER),
            "--data", f"imagefolder:{cdata.root()}"]


def _command(args: argparse.Namespace, place: dict[str, str], task: list[str],
             extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "autocompress", "search", *task, "--study", place["study"],
            "--storage", place["storage"], "--artifacts", place["artifacts"],
            "--trials", "10000", "--time-limit", f"{args.minutes:g}", "--seed", str(args.seed),
            "--train-threads", "1", "--threads", "1", "--device", "cpu", *extra]


def _run_both(jobs: list[dict[str, Any]]) -> None:
    """Start both searches at once (one per core), wait for both."""
    started = time.perf_counter()
    for job in jobs:
        job["log"] = CACHE / f"student_{job['label']}.log"  # gitignored, beside the studies
        job["handle"] = job["log"].open("w")
        job["process"] = subprocess.Popen(job["cmd"], cwd=REPO, text=True,
                                          env={**os.environ, **SINGLE_THREAD_ENV},
                                          stdout=job["handle"], stderr=subprocess.STDOUT)
        log(f"started {job['label']}: {' '.join(job['cmd'][3:])}")
    for job in jobs:
        job["returncode"] = job["process"].wait()
        job["wall_s"] = round(time.perf_counter() - started, 1)
        job["handle"].close()
        log(f"{job['label']} ended ({job['returncode']}) after {job['wall_s']} s")


def _records(place: dict[str, str]) -> list[Any]:
    from autocompress.study import load_existing_study, records

    return records(load_existing_study(place["storage"], place["study"]))


def _point(r: Any, fp32_size: float) -> dict[str, Any]:
    return {"trial": r.number, "base": r.base_model or "teacher", "val": r.accuracy,
            "test": r.test_accuracy, "times_smaller": round(fp32_size / r.size_bytes, 2),
            "latency_vs_fp32": r.latency_vs_fp32, "plan": r.plan_summary}


def figures(recs: list[Any]) -> dict[str, Any]:
    """The arm's front figures and its student's distillation trial."""
    from autocompress.results.pareto import fp32_record
    from autocompress.study import attrs as trial_attrs

    fp32 = fp32_record(recs)
    if fp32 is None or not fp32.size_bytes or fp32.accuracy is None:
        return {"error": "no measured fp32 baseline"}
    done = [r for r in recs if r.measured and r.feasible and r.size_bytes]
    near = [r for r in done if r.accuracy >= fp32.accuracy - WITHIN]
    best_near = max(near, key=lambda r: fp32.size_bytes / r.size_bytes, default=None)
    at: dict[str, Any] = {}
    for k in RATIOS:
        small = [r for r in done if fp32.size_bytes / r.size_bytes >= k]
        best = max(small, key=lambda r: r.accuracy, default=None)
        at[f"{k:g}x"] = None if best is None else _point(best, fp32.size_bytes)
    distilled = [r for r in recs if r.attrs.get(trial_attrs.STUDENT_DISTILLED)]
    student = None
    if distilled:
        d = distilled[-1]
        student = {**(_point(d, fp32.size_bytes) if d.measured else {"trial": d.number}),
                   "epochs": d.attrs.get(trial_attrs.STUDENT_EPOCHS),
                   "pairing": json.loads(d.attrs.get(trial_attrs.STUDENT_PAIRING) or "[]"),
                   "state": d.state, "fail_reason": d.fail_reason}
    bases = {r.base_model or "teacher" for r in done}
    return {"fp32": {"val": fp32.accuracy, "test": fp32.test_accuracy,
                     "bytes": fp32.size_bytes},
            "trials_measured": len(done), "bases": sorted(bases),
            "student_trials": sum(1 for r in done if r.base_model is not None),
            "largest_ratio_within_1pt": None if best_near is None
            else _point(best_near, fp32.size_bytes),
            "best_at": at, "student": student}


def _cell(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    test = "-" if p.get("test") is None else f"{p['test']:.4f}"
    return f"{p['times_smaller']:.1f}x val {p['val']:.4f} test {test} #{p['trial']} ({p['base']})"


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Student vs no student at equal wall-clock ({data['minutes']:g} min each)", "",
             f"Student `{data['student']}`, {data['epochs']} distillation epoch(s) asked; "
             f"teacher `{data['teacher']}`. Both searches ran at the same time, one per core.",
             ""]
    if data.get("machine"):
        lines += [f"**Conditions:** {data['machine']}. At the end: {data['machine_end']}.", ""]
    rows = []
    for arm in ("without", "with"):
        f = data["arms"][arm]["figures"]
        if "error" in f:
            rows.append([arm, f["error"], "", "", "", "", ""])
            continue
        rows.append([arm, f"{f['fp32']['val']:.4f}", f["trials_measured"],
                     f["student_trials"], _cell(f["largest_ratio_within_1pt"]),
                     *(_cell(f["best_at"][f"{k:g}x"]) for k in RATIOS[:2])])
    lines += [md_table(["arm", "fp32 val", "trials", "student trials",
                        "largest ratio within 1 pt (val)", "best >= 8x", ">= 12x"], rows), ""]
    s = data["arms"]["with"]["figures"].get("student")
    if s:
        lines += [f"Student distillation (trial {s['trial']}, {s['state']}): {s['epochs']} "
                  f"epoch(s), val {s.get('val')}, test {s.get('test')}, "
                  f"{s.get('times_smaller')}x smaller than the teacher's fp32, latency "
                  f"{s.get('latency_vs_fp32')} x the teacher's; pairing {s['pairing']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="time limit of each search")
    p.add_argument("--epochs", type=int, default=15, help="--student-epochs")
    p.add_argument("--student", default=None, help="student spec (default: zoo ResNet-8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo", action="store_true", help="digits demo: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    student = args.student or (DEMO_STUDENT if args.demo else "autocompress.zoo:resnet8")
    args.out.mkdir(parents=True, exist_ok=True)
    task = _task_flags(args)
    jobs = []
    for label, extra in (("without", []), ("with", ["--student", student,
                                                     "--student-epochs", str(args.epochs)])):
        place = study_place(CACHE, f"student-{label}-{args.seed}")
        jobs.append({"label": label, "place": place,
                     "cmd": _command(args, place, task, extra)})
    before = machine_state(ort_threads=1, torch_threads=1)
    _run_both(jobs)
    data: dict[str, Any] = {"minutes": args.minutes, "epochs": args.epochs, "student": student,
                            "teacher": "demo" if args.demo else MODEL_SPEC, "arms": {},
                            "machine": state_line(before),
                            "machine_end": state_line(machine_state(ort_threads=1,
                                                                    torch_threads=1))}
    for job in jobs:
        figs = figures(_records(job["place"])) if job["returncode"] == 0 else {
            "error": f"search exited {job['returncode']} (see {job['log']})"}
        data["arms"][job["label"]] = {"wall_s": job["wall_s"], "command": job["cmd"][3:],
                                      "figures": figs}
    write_json(args.out / "student.json", data)
    text = markdown(data)
    write_text(args.out / "student.md", text)
    log(text)
    return 0 if all(j["returncode"] == 0 for j in jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
