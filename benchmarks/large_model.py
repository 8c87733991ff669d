"""Issue 31's real-size model: ``torchvision:resnet18`` at 224x224 on an ImageFolder, default
settings, ``--time-limit 30``, on this CPU. Does the search return a measured front within
its limit (+10%), with at least 10 measured candidates beyond the baselines, and say what
fidelity each had?

    python benchmarks/large_model.py                   # 30 minutes
    python benchmarks/large_model.py --minutes 3 --out /tmp/lm   # a smoke run

The ImageFolder is a class-balanced subset of the JPEG CIFAR-10 (``--train-per-class``
training and ``--test-per-class`` test images of each class, symlinked), resized to 224 by
the package. torchvision's resnet18 has no downloadable weights on this offline machine: the
model is torchvision's own initialisation, trained by nobody, so its accuracies say nothing;
this benchmark is about time and fidelity, which do not depend on the weights.

One ``autocompress search`` process, default settings (threads: the package's defaults),
nothing else on the machine. Writes ``<out>/large_model.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    RESULTS,
    LoadSampler,
    machine_state,
    md_table,
    state_line,
    steal_text,
    study_place,
    write_json,
    write_text,
)

CACHE = REPO / "benchmarks" / "cache" / "large_model"  # gitignored
LIMIT_SLACK = 1.10  # the "within its limit (+10%)"
MIN_CANDIDATES = 10


def log(msg: str) -> None:
    print(msg, flush=True)


def make_subset(train_per_class: int, test_per_class: int) -> Path:
    """An ImageFolder of symlinks to the first images of each CIFAR-10 class."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cifar10 import data as cdata

    log(f"data: {cdata.ensure_cifar()}")
    source = cdata.root()
    target = CACHE / f"imagefolder-{train_per_class}-{test_per_class}"
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(p.name for p in (source / split).iterdir() if p.is_dir()):
            folder = target / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for image in sorted((source / split / cls).iterdir())[:count]:
                link = folder / image.name
                if not link.exists():
                    link.symlink_to(image)
    return target


def run(args: argparse.Namespace, folder: Path, loads: LoadSampler) -> dict[str, Any]:
    place = study_place(CACHE, "resnet18")
    cmd = [sys.executable, "-m", "autocompress", "search", "--model", "torchvision:resnet18",
           "--num-classes", "10", "--input-size", "224", "--data", f"imagefolder:{folder}",
           "--study", "resnet18", "--storage", place["storage"],
           "--artifacts", place["artifacts"], "--time-limit", f"{args.minutes:g}"]
    log("   " + " ".join(cmd[1:]))
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    loads.mark("search done")
    (CACHE / "search.log").write_text(proc.stdout + proc.stderr)
    log(proc.stdout[-6000:])
    log(proc.stderr[-3000:])
    return {"cmd": cmd, "wall_s": wall, "returncode": proc.returncode,
            "stdout_tail": proc.stdout[-8000:], "stderr_tail": proc.stderr[-4000:],
            "storage": place["storage"]}


def study_figures(storage: str) -> dict[str, Any]:
    from autocompress.api import load_study
    from autocompress.study import attrs as trial_attrs

    handle = load_study("resnet18", storage)
    records = handle.records()
    rows = []
    for r in records:
        rows.append({"number": r.number, "state": r.state, "baseline": r.baseline,
                     "fidelity": r.attrs.get(trial_attrs.FIDELITY),
                     "parent": r.attrs.get(trial_attrs.PARENT),
                     "steps_run": r.attrs.get(trial_attrs.FINETUNE_STEPS_RUN),
                     "measured": r.measured, "feasible": r.feasible,
                     "accuracy": r.accuracy, "size_bytes": r.size_bytes,
                     "latency_ms": r.latency_ms, "plan": r.plan_summary,
                     "rejected": r.rejected, "fail_reason": r.fail_reason})
    front = [r.number for r in handle.pareto_front()]
    beyond = [row for row in rows if row["measured"] and row["baseline"] is None]
    return {"rows": rows, "front": front, "measured_beyond_baselines": len(beyond),
            "by_fidelity": {f: sum(1 for row in beyond if row["fidelity"] == f)
                            for f in sorted({str(row["fidelity"]) for row in beyond})}}


def report(args: argparse.Namespace, data: dict[str, Any]) -> str:
    search, figures = data["search"], data["figures"]
    limit_s = args.minutes * 60
    within = search["wall_s"] <= limit_s * LIMIT_SLACK
    enough = figures["measured_beyond_baselines"] >= MIN_CANDIDATES
    table = md_table(
        ["trial", "state", "fidelity", "from", "steps", "accuracy", "size KB", "latency ms",
         "plan / why"],
        [[r["number"], r["state"].lower(), (r["baseline"] and f"baseline {r['baseline']}")
          or r["fidelity"] or "-", "-" if r["parent"] is None else f"#{r['parent']}",
          r["steps_run"] or 0, "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
          "-" if not r["size_bytes"] else f"{r['size_bytes'] / 1000:.0f}",
          "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}",
          r["rejected"] or r["fail_reason"] or r["plan"] or "-"] for r in figures["rows"]])
    return "\n".join([
        "# A real-size model within its time limit: resnet18 at 224x224",
        "",
        f"Generated by `python benchmarks/large_model.py --minutes {args.minutes:g} "
        f"--train-per-class {args.train_per_class} --test-per-class {args.test_per_class}`.",
        "",
        f"**Conditions:** {state_line(data['state_before'])}; load average (1 min) "
        f"{data['load']['min']}-{data['load']['max']}{steal_text(data['load'])}.",
        "",
        "`autocompress search --model torchvision:resnet18 --num-classes 10 --input-size 224 "
        f"--data imagefolder:<CIFAR-10 subset> --time-limit {args.minutes:g}`, default settings "
        "otherwise. The model is torchvision's untrained initialisation (no weights can be "
        "downloaded here): accuracies are meaningless, times and fidelities are the finding.",
        "",
        f"- wall time {search['wall_s'] / 60:.1f} min of a {args.minutes:g}-min limit "
        f"(+10%: {limit_s * LIMIT_SLACK / 60:.1f}): **{'MET' if within else 'MISSED'}**",
        f"- measured candidates beyond the baselines: {figures['measured_beyond_baselines']} "
        f"(by fidelity: {figures['by_fidelity']}), at least {MIN_CANDIDATES}: "
        f"**{'MET' if enough else 'MISSED'}**",
        f"- Pareto front: trials {figures['front']}; exit code {search['returncode']}",
        "",
        table,
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    loads = LoadSampler()
    loads.mark("start")
    state_before = machine_state(ort_threads=0, torch_threads=0)
    folder = make_subset(args.train_per_class, args.test_per_class)
    search = run(args, folder, loads)
    data = {"search": search, "figures": study_figures(search["storage"]),
            "state_before": state_before, "load": loads.summary(),
            "args": {k: str(v) for k, v in vars(args).items()}}
    text = report(args, data)
    write_json(args.out / "large_model.json", data)
    print(write_text(args.out / "large_model.md", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
