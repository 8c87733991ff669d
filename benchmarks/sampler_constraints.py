"""Do the samplers learn a budget from rejected plans? A toy with the search's trial shape.

    python benchmarks/sampler_constraints.py [--trials 60] [--seeds 0 1 2]

Ten "prune ratios" on the search's grid (0 to 0.7 in 0.05 steps); a plan that keeps more
than 55% of the work breaks the "latency budget" and is stored the way the search stores a
pre-check rejection: state PRUNED, its constraint set (> 0), no objective values. Feasible
plans complete with two objectives (an "accuracy" that falls with pruning, the work kept).
Counts the infeasible proposals of each sampler as ``autocompress.study.make_sampler`` builds
it (TPE is the default), against random search, same seeds. Writes
benchmarks/results/sampler_constraints.md and .json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import optuna
from _common import RESULTS, md_table, write_json, write_text

from autocompress.study import make_sampler

SAMPLERS = ("tpe", "random", "nsga2", "gp")


def infeasible_proposals(sampler: str, seed: int, trials: int) -> tuple[int, float]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(sampler, seed, startup_trials=10))
    infeasible = 0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        nonlocal infeasible
        ratios = [trial.suggest_float(f"prune/{i}", 0.0, 0.7, step=0.05) for i in range(10)]
        kept = sum(1 - r for r in ratios) / 10
        violation = (kept - 0.55) / 0.55
        trial.set_constraint("latency", violation)
        if violation > 0:
            infeasible += 1
            raise optuna.TrialPruned("over budget at pre-check")
        return 1.0 - sum(r * r for r in ratios) / 10, kept

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=trials)
    return infeasible, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for sampler in SAMPLERS:
        runs = [infeasible_proposals(sampler, seed, args.trials) for seed in args.seeds]
        results[sampler] = [n for n, _ in runs]
        seconds[sampler] = sum(s for _, s in runs)
        print(f"{sampler}: {results[sampler]}", flush=True)
    base = statistics.mean(results["random"])
    rows = [[s, ", ".join(map(str, results[s])), f"{statistics.mean(results[s]):.1f}",
             f"{statistics.mean(results[s]) / base:.2f}", f"{seconds[s]:.1f}"] for s in SAMPLERS]
    text = "\n".join([
        "# Rejected plans reach the sampler (toy with the search's trial shape)",
        "",
        f"Command: `python benchmarks/sampler_constraints.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.trials} trials per run, seeds {args.seeds}; infeasible proposals per run "
        "(rejections stored as PRUNED + constraint, no values, as the search stores them):",
        "",
        md_table(["sampler", "infeasible per seed", "mean", "vs random", "seconds"], rows),
        "",
        "TPE splits trials by constraint violation before their values (PRUNED ones too), so "
        "it learns the budget from rejections; NSGA-II and GP read COMPLETE trials only and "
        "learn nothing from them (no false accuracy either).",
        "",
    ])
    write_json(RESULTS / "sampler_constraints.json",
               {"trials": args.trials, "seeds": args.seeds, "infeasible": results,
                "seconds": seconds})
    write_text(RESULTS / "sampler_constraints.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
