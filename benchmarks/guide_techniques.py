"""The guide's other techniques in the search: a front with unstructured sparsity, feature
distillation and PTQ candidates available, against the same search without them, at equal
wall-clock (issue 16).

    python benchmarks/guide_techniques.py                          # 2 seeds x 2 arms x 10 min
    python benchmarks/guide_techniques.py --minutes 1 --demo --seeds 0   # a smoke run

Arms, each an ``autocompress search`` with ``--time-limit`` minutes on ResNet-20 / CIFAR-10
(the shared teacher), one after the other, nothing else running; both count size as the
zipped file (``--size-metric zip``: what sparsity saves), everything else at its default:

- guide: ``--sparsity-max 0.8 --sparsity-scope global --feature-weight-max 1
  --ptq-methods minmax,entropy,percentile``;
- plain: without them (QAT + KD per candidate, structured pruning and bit widths only).

Hypervolume: ``pareto.hypervolume_2d`` of each study's feasible front (validation accuracy,
zipped size; each plan at its most-trained trial) against the fp32 file's zipped size x 1.1
and chance accuracy (0.1). Also the share of trials that were cheap PTQ candidates and what
they cost. Writes benchmarks/results/guide_techniques.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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

STUDIES = REPO / "benchmarks" / "cache" / "guide_techniques"  # gitignored
CHANCE = 0.1
COMMON: dict[str, Any] = {"size_metric": "zip"}
ARMS: dict[str, dict[str, Any]] = {
    "guide": {"sparsity_max": 0.8, "sparsity_scope": "global", "feature_weight_max": 1.0,
              "ptq_methods": ("minmax", "entropy", "percentile")},
    "plain": {},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def _seconds(record: Any) -> float:
    timing = record.attrs.get("timing")
    return sum(json.loads(timing).values()) if isinstance(timing, str) else 0.0


def run_arm(arm: str, seed: int, minutes: float, spec: Any, torch_threads: int,
            loads: LoadSampler) -> dict[str, Any]:
    from autocompress.config.options import SearchConfig
    from autocompress.results.pareto import hypervolume_2d, pareto_front
    from autocompress.search.loop import run_search

    model, weights, data = spec
    place = study_place(STUDIES, f"guide-{arm}-s{seed}" + ("-demo" if model is None else ""))
    config = SearchConfig(
        model=model, weights=weights, data=data, **place, trials=10_000, time_limit=minutes,
        seed=seed, train_threads=torch_threads, device="cpu", **COMMON, **ARMS[arm],
    )
    started = time.perf_counter()
    result = run_search(config, on_progress=progress_printer(loads), on_start=log)
    wall = time.perf_counter() - started
    fp32 = next(r for r in result.records if r.baseline == "fp32")
    reference = 1.1 * float(fp32.objective_size or 0)
    searched = [r for r in result.records if r.measured and r.baseline is None]
    ptq = [r for r in searched if r.plan.get("realisation") == "ptq"]
    qat = [r for r in searched if r.plan.get("realisation") != "ptq"]
    front = pareto_front(result.records)
    return {
        "arm": arm, "seed": seed, "wall_s": wall, "trials": len(result.records),
        "measured": len(searched), "ptq": len(ptq),
        "ptq_mean_s": statistics.mean(map(_seconds, ptq)) if ptq else None,
        "qat_mean_s": statistics.mean(map(_seconds, qat)) if qat else None,
        "sparse": sum(1 for r in searched if r.plan.get("global_sparsity", 0) > 0),
        "feature_kd": sum(1 for r in searched if r.plan.get("feature_weight", 0) > 0),
        "front": [(r.number, r.accuracy, r.objective_size, r.size_bytes, r.plan_summary)
                  for r in front],
        "hypervolume": hypervolume_2d(result.records, reference, CHANCE),
        "reference_size": reference,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--demo", action="store_true", help="digits demo instead of CIFAR-10")
    parser.add_argument("--stem", default=None)
    args = parser.parse_args()
    stem = args.stem or ("guide_techniques_demo" if args.demo else "guide_techniques")
    torch_threads, loads, state = start_benchmark("guide-techniques", args.torch_threads, log)
    spec = resnet20_task(args.demo, log)
    runs, summary = run_arms(
        list(ARMS), args.seeds, args.minutes,
        lambda arm, seed: run_arm(arm, seed, args.minutes, spec, torch_threads, loads), log)
    ratio = summary["guide"]["mean"] / summary["plain"]["mean"]
    guide_runs = [r for r in runs if r["arm"] == "guide"]
    ptq_share = sum(r["ptq"] for r in guide_runs) / max(1, sum(r["measured"] for r in guide_runs))
    data = {
        "command": "python benchmarks/guide_techniques.py " + " ".join(sys.argv[1:]),
        "machine": state_line(state),
        "machine_end": state_line(machine_state(ort_threads=1, torch_threads=torch_threads)),
        "load": loads.summary(), "minutes": args.minutes, "arms": ARMS, "common": COMMON,
        "runs": runs, "summary": summary, "ratio": ratio, "ptq_share": ptq_share,
    }
    write_json(RESULTS / f"{stem}.json", data)

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = [[r["arm"], r["seed"], r["trials"], r["measured"], r["ptq"], secs(r["ptq_mean_s"]),
             secs(r["qat_mean_s"]), r["sparse"], r["feature_kd"], len(r["front"]),
             f"{r['hypervolume']:.4f}", f"{r['wall_s'] / 60:.1f}"] for r in runs]
    fronts = [f"- {r['arm']} seed {r['seed']}: " + "; ".join(
        f"#{n} acc {a:.4f} zip {z / 1000:.1f} KB (file {f / 1000:.1f} KB) {s}"
        for n, a, z, f, s in r["front"]) for r in runs]
    text = "\n".join([
        "# Sparsity, feature KD and PTQ candidates in the search: hypervolume at equal "
        "wall-clock", "",
        f"Generated by `{data['command']}`.", "",
        f"**Conditions:** {data['machine']}. At the end: {data['machine_end']}.", "",
        md_table(["arm", "seed", "trials", "measured", "PTQ", "PTQ s/trial", "QAT s/trial",
                  "sparse", "feature KD", "front", "hypervolume (zip)", "wall min"], rows), "",
        "| arm | mean | min | max |", "|---|---|---|---|",
        *(f"| {arm} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
          for arm, s in summary.items()), "",
        f"**guide / plain = {ratio:.3f}**; PTQ candidates were {ptq_share:.0%} of the guide "
        "arm's measured search trials.", "",
        "Fronts (validation accuracy, zipped size):", "", *fronts, "",
    ])
    write_text(RESULTS / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
