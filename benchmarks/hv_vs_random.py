"""Hypervolume of the default search against random search at equal wall-clock.

    python benchmarks/hv_vs_random.py                          # 2 seeds x 2 arms x 15 min
    python benchmarks/hv_vs_random.py --minutes 2 --demo --seeds 0   # a smoke run
    python benchmarks/hv_vs_random.py --from-json results/hv_vs_random.json  # report again

Arms, each an ``autocompress search`` with ``--time-limit`` minutes on ResNet-20 / CIFAR-10
(the shared teacher), one after the other, nothing else running:

- default: every default (TPE, warm starts, sensitivity pass and guided plans, promotions);
- random: ``--sampler random --no-warm-starts --no-guided --promote-share 0`` (plain random
  search over the same space, same fine-tune per candidate).

Hypervolume: ``pareto.hypervolume_2d`` of each study's feasible front (validation accuracy,
file size; each plan at its most-trained trial) against one fixed reference point, the fp32
file's size x 1.1 and chance accuracy (0.1). Reported per run, as mean and spread per arm, and
as the ratio of the means, with the ceiling that reference allows (a zero-byte model as
accurate as the best trial) and, as context, the same fronts on a log-size axis. Writes
benchmarks/results/hv_vs_random.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
    progress_printer,
    resnet20_task,
    run_arms,
    start_benchmark,
    state_line,
    study_place,
    write_json,
    write_text,
)

STUDIES = REPO / "benchmarks" / "cache" / "hv_vs_random"  # gitignored
CHANCE = 0.1
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "random": {"sampler": "random", "warm_starts": False, "guided": False,
               "promote_share": 0.0},
}
TARGET = 1.15


def log(msg: str) -> None:
    print(msg, flush=True)


def run_arm(arm: str, seed: int, minutes: float, spec: Any, torch_threads: int,
            loads: LoadSampler) -> dict[str, Any]:
    from autocompress.config.options import SearchConfig
    from autocompress.results.pareto import hypervolume_2d, pareto_front
    from autocompress.search.loop import run_search

    model, weights, data = spec
    place = study_place(STUDIES, f"hv-{arm}-s{seed}" + ("-demo" if model is None else ""))
    config = SearchConfig(
        model=model, weights=weights, data=data, **place, trials=10_000, time_limit=minutes,
        seed=seed, train_threads=torch_threads, device="cpu", **ARMS[arm],
    )
    started = time.perf_counter()
    result = run_search(config, on_progress=progress_printer(loads), on_start=log)
    wall = time.perf_counter() - started
    fp32 = next(r for r in result.records if r.baseline == "fp32")
    reference = 1.1 * float(fp32.size_bytes or 0)
    front = pareto_front(result.records)
    return {
        "arm": arm, "seed": seed, "wall_s": wall, "trials": len(result.records),
        "fine_tuned": sum(1 for r in result.records if r.measured and r.baseline is None),
        "front": [(r.number, r.accuracy, r.size_bytes, r.plan_summary) for r in front],
        "hypervolume": hypervolume_2d(result.records, reference, CHANCE),
        # the same without the baseline trials (fp32, ORT's int8 PTQ), which both arms share
        # and which alone cover most of the area: what each search's own trials found
        "hypervolume_searched": hypervolume_2d(
            [r for r in result.records if r.baseline is None], reference, CHANCE),
        "reference_size": reference,
        "best_accuracy": max((float(r.accuracy) for r in result.records
                              if r.measured and r.feasible and r.accuracy is not None),
                             default=CHANCE),
    }


def log_size_hypervolume(run: dict[str, Any]) -> float:
    """The run's front on a log-size axis (each halving of the file counts alike; units:
    accuracy above chance x halvings below the reference size). Context only: the target
    was set on the linear axis of ``hypervolume_2d``."""
    from autocompress.results.pareto import hypervolume_points

    points = [(acc - CHANCE, math.log2(size)) for _, acc, size, _ in run["front"]]
    return hypervolume_points(points, math.log2(run["reference_size"]))


def render(data: dict[str, Any]) -> str:
    runs, summary = data["runs"], data["summary"]
    ratio, searched, searched_ratio = data["ratio"], data["searched_means"], data[
        "searched_ratio"]
    ceiling, ceiling_ratio = data["ceiling"], data["ceiling_ratio"]
    logs = {arm: statistics.mean(log_size_hypervolume(r) for r in runs if r["arm"] == arm)
            for arm in summary}
    rows = [[r["arm"], r["seed"], r["trials"], r["fine_tuned"], len(r["front"]),
             f"{r['hypervolume']:.4f}", f"{r['hypervolume_searched']:.4f}",
             f"{log_size_hypervolume(r):.3f}", f"{r['wall_s'] / 60:.1f}"] for r in runs]
    return "\n".join([
        "# Default search vs random search: hypervolume at equal wall-clock", "",
        f"Generated by `{data['command']}`.", "",
        f"**Conditions:** {data['machine']}. At the end: {data['machine_end']}.", "",
        md_table(["arm", "seed", "trials", "fine-tuned", "front", "hypervolume",
                  "hypervolume without baselines", "log-size hypervolume", "wall min"],
                 rows), "",
        "| arm | mean | min | max |", "|---|---|---|---|",
        *(f"| {arm} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
          for arm, s in summary.items()), "",
        f"**default / random = {ratio:.3f}** (target >= {TARGET}: "
        f"{'MET' if ratio >= TARGET else 'MISSED'}).", "",
        "Without the baseline trials (fp32 and ORT's int8 PTQ, the same recipes in both arms): "
        + ("random found no feasible trial" if searched_ratio is None else
           f"default / random = {searched_ratio:.3f} (means {searched['default']:.4f} / "
           f"{searched['random']:.4f}); the target is judged on the whole front above."), "",
        f"Ceiling: a zero-byte model as accurate as the best trial of either arm "
        f"({ceiling + CHANCE:.4f}) would cover {ceiling:.4f}, i.e. at most "
        f"{ceiling_ratio:.3f}x random's mean with the accuracies seen"
        + (" (the target lies above it: no front of these accuracies reaches it)."
           if ceiling_ratio < TARGET else "."), "",
        "Context, not the judged metric: on a log-size axis (each halving of the file counts "
        "alike; on the linear axis every plan 4x smaller or more shares the last quarter of "
        f"the width) default / random = {logs['default'] / logs['random']:.3f} (means "
        f"{logs['default']:.3f} / {logs['random']:.3f}).", "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--demo", action="store_true", help="digits demo instead of CIFAR-10")
    parser.add_argument("--stem", default=None)
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="write the report again from a finished run's JSON (no search)")
    args = parser.parse_args()
    stem = args.stem or ("hv_vs_random_demo" if args.demo else "hv_vs_random")
    if args.from_json:
        text = render(json.loads(args.from_json.read_text()))
        write_text(RESULTS / f"{stem}.md", text)
        print(text)
        return 0
    torch_threads, loads, state = start_benchmark("hv-vs-random", args.torch_threads, log)
    spec = resnet20_task(args.demo, log)
    runs, summary = run_arms(
        list(ARMS), args.seeds, args.minutes,
        lambda arm, seed: run_arm(arm, seed, args.minutes, spec, torch_threads, loads), log)
    ratio = summary["default"]["mean"] / summary["random"]["mean"]
    searched = {arm: sum(r["hypervolume_searched"] for r in runs if r["arm"] == arm)
                / max(1, sum(1 for r in runs if r["arm"] == arm)) for arm in ARMS}
    searched_ratio = searched["default"] / searched["random"] if searched["random"] else None
    # The most any front can cover under this reference point: a zero-byte model as accurate
    # as the best trial of either arm spans the whole width, (best - chance) x 1. Divided by
    # random's mean, the largest ratio the default arm could show with the accuracies seen.
    ceiling = max(r["best_accuracy"] for r in runs) - CHANCE
    ceiling_ratio = ceiling / summary["random"]["mean"]
    data = {
        "command": "python benchmarks/hv_vs_random.py " + " ".join(sys.argv[1:]),
        "machine": state_line(state),
        "machine_end": state_line(machine_state(ort_threads=1, torch_threads=torch_threads)),
        "load": loads.summary(), "minutes": args.minutes, "runs": runs, "summary": summary,
        "ratio": ratio, "searched_means": searched, "searched_ratio": searched_ratio,
        "ceiling": ceiling, "ceiling_ratio": ceiling_ratio,
    }
    write_json(RESULTS / f"{stem}.json", data)
    text = render(data)
    write_text(RESULTS / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
