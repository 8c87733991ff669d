"""The built-in demo search, timed: `autocompress search --budget 50ms` on a fresh machine.

Part 1 runs ``run_search`` with the defaults, a 50 ms latency budget, a fresh temporary
storage and (by default) a fresh model cache, so the demo teacher is trained as on a new
machine, and reports: wall time (target < 5 min on 2 cores), trials (>= 20), feasible front
size (>= 3), whether the front holds a candidate >= 4x smaller than fp32 within 1 point of
its accuracy, and the framework overhead.

Framework overhead = 1 - (fine-tune forward/backward time) / (trial time). The trial's
``timing["finetune"]`` phase also holds fake-quant preparation, calibration and the periodic
validation passes of the early-stop rule; to count only forward/backward, this script wraps
``distill.finetune`` (not edited, just wrapped in this process) and times its ``evaluate``
callbacks separately. Both the coarse and the strict figure are reported.

Part 2 is a short second search whose budgets sit just above the int8 floor (the most-pruned
uniform int8 structure, measured here first the way the pre-check measures it), so most
candidates break a budget at pre-check: it reports the time per rejection (target < 3 s) and
checks that no rejected trial spent fine-tune time (no "finetune" key in its timing).

    python benchmarks/search_demo.py [--torch-threads N] [--keep-cache]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    FinetuneProbe,
    LoadSampler,
    choose_torch_threads,
    fmt_bytes,
    fmt_ms,
    machine_state,
    md_table,
    met,
    overhead,
    progress_printer,
    state_line,
    steal_text,
    text_table,
    trial_rows,
    write_json,
    write_text,
)

TARGET_WALL_S = 300.0
TARGET_TRIALS = 20
TARGET_FRONT = 3
TARGET_REJECT_S = 3.0
TARGET_OVERHEAD = 0.20
FLOOR_LATENCY_MARGIN = 1.2  # latency budget = 1.2 x int8 floor (noise: +-20% seen here)
FLOOR_SIZE_MARGIN = 1.1  # size budget = 1.1 x int8 floor file size


# -- part 1 ------------------------------------------------------------------------------------


def run_demo(folder: Path, budget: str, loads: LoadSampler, probe: FinetuneProbe
             ) -> dict[str, Any]:
    from autocompress.config.options import SearchConfig
    from autocompress.search.loop import run_search

    url = f"sqlite:///{folder / 'demo.db'}"
    config = SearchConfig(study="demo", storage=url, budgets=(budget,))
    setup: dict[str, float] = {}
    started = time.perf_counter()

    def on_start(message: str) -> None:
        setup["s"] = time.perf_counter() - started
        print(f"  {message} (setup {setup['s']:.1f} s)", flush=True)

    result = run_search(config, on_progress=progress_printer(loads), on_start=on_start)
    wall = time.perf_counter() - started
    rows = trial_rows(url, config.study, config.seed, probe)
    fp32 = result.fp32
    front = []
    for r in result.front:
        front.append({
            "number": r.number,
            "baseline": r.baseline,
            "plan_summary": r.plan_summary,
            "accuracy": r.accuracy,
            "test_accuracy": r.test_accuracy,
            "size_bytes": r.size_bytes,
            "times_smaller": fp32.size_bytes / r.size_bytes if fp32 and r.size_bytes else None,
            "latency_ms": r.latency_ms,
            "latency_spread_ms": r.latency_spread_ms,
            "latency_vs_fp32": r.latency_vs_fp32,
        })
    small_good = [
        f for f in front
        if fp32 and f["times_smaller"] and f["times_smaller"] >= 4.0
        and f["accuracy"] >= (fp32.accuracy or 0) - 0.01
    ]
    states: dict[str, int] = {}
    for r in rows:
        key = r["state"] if not r["rejected"] else "REJECTED"
        states[key] = states.get(key, 0) + 1
    return {
        "config": config.to_dict(),
        "wall_s": wall,
        "setup_s": setup.get("s"),
        "trials_total": len(rows),
        "trials_search": sum(1 for r in rows if not r["baseline"]),
        "states": states,
        "fp32": {
            "accuracy": fp32.accuracy if fp32 else None,
            "test_accuracy": fp32.test_accuracy if fp32 else None,
            "size_bytes": fp32.size_bytes if fp32 else None,
            "latency_ms": fp32.latency_ms if fp32 else None,
        },
        "front": front,
        "front_size": len(front),
        "small_and_accurate": small_good,
        "overhead": overhead(rows, wall),
        "trials": rows,
    }


# -- part 2 ------------------------------------------------------------------------------------


def int8_floor(cache: Path, threads: int) -> dict[str, Any]:
    """Latency and size of the most-pruned uniform int8 structure, measured as the pre-check
    measures (export at planned widths, session options picked, interleaved with fp32)."""
    from autocompress import intake
    from autocompress.config.options import SearchConfig
    from autocompress.model import space
    from autocompress.runtime import measure, timing
    from autocompress.transform import quantize
    from autocompress.transform.student import build_student
    from autocompress.transform.survey import build_inventory
    from autocompress.trial.precheck import PRECHECK_REPEATS

    config = SearchConfig()
    task = intake.load_task(None, None, None, seed=config.seed, cache_dir=cache)
    example = task.data.example_input(1)
    inventory = build_inventory(task.model, example)
    ratio = space.prune_high(config)
    plan = space.uniform_plan(inventory, config, bits=8, ratio=ratio)
    student = build_student(task, plan, config.round_to)
    calibration = [x for x, _ in task.data.batches("train", 32)][:8]
    qat = quantize.prepare_qat(student, plan)
    quantize.calibrate(qat, calibration)
    shape = (1, *task.input_shape)
    with tempfile.TemporaryDirectory(prefix="ac-floor-") as tmp:
        fp32 = quantize.export_float_onnx(task.model, example, Path(tmp) / "fp32.onnx")
        path = quantize.export_onnx(qat, example, Path(tmp) / "floor.onnx", plan,
                                    calibration).path
        options, _ = timing.pick_session_options(path, shape, threads=threads)
        inter = timing.time_interleaved(
            path, fp32, shape, threads=threads, candidate_options=options,
            reference_options={}, rounds=2, repeats=PRECHECK_REPEATS,
        )
        size = measure.file_size(path)
    return {
        "structure": f"every group pruned {ratio:.0%} at 8 bits",
        "latency_ms": inter.candidate.median_ms,
        "latency_spread_ms": inter.candidate.spread_ms,
        "fp32_latency_ms": inter.reference.median_ms,
        "size_bytes": size,
    }


def run_rejections(folder: Path, cache: Path, loads: LoadSampler, probe: FinetuneProbe,
                   trials: int) -> dict[str, Any]:
    from autocompress.config.options import SearchConfig
    from autocompress.search.loop import run_search

    floor = int8_floor(cache, threads=1)
    latency_budget = f"{floor['latency_ms'] * FLOOR_LATENCY_MARGIN:.4f}ms"
    size_budget = f"{floor['size_bytes'] * FLOOR_SIZE_MARGIN:.0f}B"
    print(f"  int8 floor ({floor['structure']}): {floor['latency_ms']:.4f} ms, "
          f"{fmt_bytes(floor['size_bytes'])}; budgets {latency_budget}, {size_budget}",
          flush=True)
    url = f"sqlite:///{folder / 'reject.db'}"
    config = SearchConfig(
        study="reject", storage=url, budgets=(latency_budget, size_budget), trials=trials,
        finetune_steps=40,
    )
    started = time.perf_counter()
    error = None
    try:
        run_search(config, on_progress=progress_printer(loads))
    except Exception as exc:  # a BudgetError here is a finding, not a crash of the benchmark
        error = f"{type(exc).__name__}: {exc}"
        print(f"  second search stopped: {error}", flush=True)
    wall = time.perf_counter() - started
    rows = trial_rows(url, config.study, config.seed, probe) if Path(url[10:]).exists() else []
    rejected = [r for r in rows if r["rejected"]]
    times = [r["duration_s"] for r in rejected if r["duration_s"] is not None]
    cached = [r for r in rejected if r["timing"].get("precheck", 1.0) < 0.05]
    with_finetune = [r["number"] for r in rejected if "finetune" in r["timing"]]
    return {
        "config": config.to_dict(),
        "floor": floor,
        "error": error,
        "wall_s": wall,
        "trials_total": len(rows),
        "rejected": len(rejected),
        "rejected_by_cached_precheck": len(cached),
        "rejection_seconds": {
            "median": statistics.median(times) if times else None,
            "max": max(times) if times else None,
            "min": min(times) if times else None,
            "all": [round(t, 3) for t in times],
        },
        "rejected_with_finetune_timing": with_finetune,
        "reasons": [r["rejected"] for r in rejected],
        "trials": rows,
    }


# -- report ------------------------------------------------------------------------------------


def _front_table(part1: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["trial", "plan", "val acc", "test acc", "size", "x smaller", "latency ms",
               "x fp32"]
    rows = []
    for f in part1["front"]:
        rows.append([
            f"#{f['number']}" + (f" ({f['baseline']})" if f["baseline"] else ""),
            f["plan_summary"],
            f"{f['accuracy']:.4f}",
            f"{f['test_accuracy']:.4f}" if f["test_accuracy"] is not None else "-",
            fmt_bytes(f["size_bytes"]),
            f"{f['times_smaller']:.1f}" if f["times_smaller"] else "-",
            fmt_ms(f["latency_ms"], f["latency_spread_ms"]),
            f"{f['latency_vs_fp32']:.2f}" if f["latency_vs_fp32"] else "-",
        ])
    return headers, rows


def targets(part1: dict[str, Any], part2: dict[str, Any] | None) -> list[list[str]]:
    ov = part1["overhead"]
    rows = [
        ["wall time < 5 min", f"{part1['wall_s']:.0f} s", met(part1["wall_s"] < TARGET_WALL_S)],
        [">= 20 trials", f"{part1['trials_total']} ({part1['trials_search']} search + "
         f"{part1['trials_total'] - part1['trials_search']} baselines)",
         met(part1["trials_total"] >= TARGET_TRIALS)],
        ["feasible front >= 3", str(part1["front_size"]), met(part1["front_size"] >= TARGET_FRONT)],
        [">= 4x smaller within 1 pt of fp32",
         ", ".join(f"#{f['number']} {f['times_smaller']:.1f}x {f['accuracy']:.4f}"
                   for f in part1["small_and_accurate"]) or "none",
         met(bool(part1["small_and_accurate"]))],
    ]
    if ov.get("fine_tuned_trials"):
        rows.append(["framework overhead < 20% (strict: all but fwd/bwd)",
                     f"{ov['strict']:.1%} (coarse, finetune phase: {ov['coarse']:.1%}; "
                     f"whole search incl. setup/baselines: {ov['whole_search']:.1%})",
                     met(ov["strict"] < TARGET_OVERHEAD)])
    if part2 is not None:
        med = part2["rejection_seconds"]["median"]
        mx = part2["rejection_seconds"]["max"]
        rows.append(["over-budget rejection < 3 s",
                     f"median {med:.2f} s, max {mx:.2f} s over {part2['rejected']} rejections"
                     if med is not None else "no rejection happened",
                     met(mx is not None and mx < TARGET_REJECT_S)])
        rows.append(["no fine-tune spent on rejected trials",
                     "none had a finetune phase" if not part2["rejected_with_finetune_timing"]
                     else f"trials {part2['rejected_with_finetune_timing']}",
                     met(part2["rejected"] > 0 and not part2["rejected_with_finetune_timing"])])
    return rows


def write_markdown(data: dict[str, Any]) -> Path:
    part1, part2 = data["demo"], data.get("rejection")
    state = data["machine_start"]
    ov = part1["overhead"]
    headers, front_rows = _front_table(part1)
    lines = [
        "# Demo search (`autocompress search --budget 50ms`), timed",
        "",
        "Generated by `python benchmarks/search_demo.py`: `run_search` with every default, a "
        "50 ms latency budget, a fresh temporary SQLite storage and "
        + ("a fresh model cache (the demo teacher is trained inside the timed run)."
           if data["fresh_cache"] else "the existing model cache."),
        "",
        f"**Conditions:** {state_line(state)}. Inside `run_search` the fine-tunes ran with "
        f"{part1['config'].get('train_threads', '?')} torch thread(s) (`train_threads`, the "
        "default; the process setting above applies outside the search). Load average during "
        f"the run: min {data['load']['min']:.1f}, max {data['load']['max']:.1f} on "
        f"{state['cpu_count']} cores{steal_text(data['load'])} (other engineers' tests ran at "
        "the same time, so wall times "
        "are pessimistic).",
        "",
        "## Targets",
        "",
        md_table(["target", "measured", "status"], targets(part1, part2)),
        "",
        f"## Demo search: {part1['trials_total']} trials in {part1['wall_s']:.0f} s "
        f"(setup {part1['setup_s']:.1f} s)",
        "",
        "States: " + ", ".join(f"{k} {v}" for k, v in sorted(part1["states"].items())) + ". "
        f"fp32 teacher: val {part1['fp32']['accuracy']:.4f}, "
        f"{fmt_bytes(part1['fp32']['size_bytes'])}, {fmt_ms(part1['fp32']['latency_ms'])} ms.",
        "",
        "Feasible Pareto front (accuracy up, size down), measured on the exported files:",
        "",
        md_table(headers, front_rows),
        "",
        "### Where a fine-tuned trial's time goes",
        "",
    ]
    if ov.get("fine_tuned_trials"):
        share = ov["phase_share_of_trial_time"]
        lines += [
            f"{ov['fine_tuned_trials']} fine-tuned trials, {ov['trial_seconds']:.1f} s in all. "
            "Share of trial time by phase: "
            + ", ".join(f"{k} {v:.1%}" for k, v in share.items())
            + f", outside any phase (sampler, storage writes, uploads) "
            f"{ov['unaccounted_share']:.1%}.",
            "",
            f"Inside the finetune phase, forward/backward took {ov['forward_backward_seconds']:.1f}"
            f" s and the early-stop validation passes {ov['evaluate_seconds_inside_finetune']:.1f}"
            " s; the rest is fake-quant preparation and observer calibration.",
            "",
            f"Framework overhead, strict (1 - forward/backward / trial time): {ov['strict']:.1%} "
            f"(median per trial {ov['strict_median_per_trial']:.1%}); coarse (1 - finetune phase"
            f" / trial time): {ov['coarse']:.1%}. Over the whole search wall time, including "
            f"setup, baselines and the floor check: {ov['whole_search']:.1%}.",
            "",
        ]
    if part2 is not None:
        fl = part2["floor"]
        lines += [
            "## Rejection at pre-check",
            "",
            f"A second search ({part2['config']['trials']} trials + baselines, fine-tune "
            f"{part2['config']['finetune_steps']} steps) with budgets just above the int8 floor "
            f"({fl['structure']}: {fl['latency_ms']:.4f} ms, {fmt_bytes(fl['size_bytes'])}): "
            f"{', '.join(part2['config']['budgets'])}.",
            "",
        ]
        if part2["error"]:
            lines += [f"The search stopped: `{part2['error']}`.", ""]
        rs = part2["rejection_seconds"]
        if rs["median"] is not None:
            lines += [
                f"{part2['rejected']} of {part2['trials_total']} trials were rejected at "
                f"pre-check ({part2['rejected_by_cached_precheck']} by a cached pre-check of a "
                f"structure already measured). Time per rejection (Optuna trial duration: "
                f"sampling, build, pre-check, storage): median {rs['median']:.2f} s, min "
                f"{rs['min']:.2f} s, max {rs['max']:.2f} s. Rejected trials with a finetune "
                f"phase in their timing: {part2['rejected_with_finetune_timing'] or 'none'}.",
                "",
                "Reasons (first 5): " + "; ".join(part2["reasons"][:5]),
                "",
            ]
    lines.append("Raw figures and every trial: `search_demo.json`.")
    return write_text(RESULTS / "search_demo.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--budget", default="50ms")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the existing model cache instead of a fresh one")
    parser.add_argument("--reject-trials", type=int, default=12)
    parser.add_argument("--skip-rejection", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite search_demo.md from search_demo.json, measure nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        import json

        saved = json.loads((RESULTS / "search_demo.json").read_text())
        print(f"wrote {write_markdown(saved)}")
        return 0
    torch_threads = choose_torch_threads(args.torch_threads)
    loads = LoadSampler()
    loads.mark("start")
    state = machine_state(ort_threads=1, torch_threads=torch_threads)
    print(state_line(state), flush=True)
    probe = FinetuneProbe()
    probe.install()
    data: dict[str, Any] = {"machine_start": state, "fresh_cache": not args.keep_cache}
    try:
        with tempfile.TemporaryDirectory(prefix="ac-search-demo-") as tmp:
            folder = Path(tmp)
            if not args.keep_cache:
                os.environ["AUTOCOMPRESS_CACHE"] = str(folder / "cache")
            from autocompress.intake import default_cache_dir

            cache = default_cache_dir()
            print(f"part 1: demo search, budget {args.budget}, cache {cache}", flush=True)
            data["demo"] = run_demo(folder, args.budget, loads, probe)
            loads.mark("after demo search")
            if not args.skip_rejection:
                print("part 2: rejection search", flush=True)
                probe.calls.clear()
                data["rejection"] = run_rejections(folder, cache, loads, probe,
                                                   args.reject_trials)
                loads.mark("after rejection search")
    finally:
        probe.uninstall()
    data["machine_end"] = machine_state(ort_threads=1, torch_threads=torch_threads)
    data["load"] = loads.summary()
    headers, rows = _front_table(data["demo"])
    print()
    print(text_table(headers, rows))
    print()
    status = targets(data["demo"], data.get("rejection"))
    print(text_table(["target", "measured", "status"], status))
    print(f"\nload average 1-min: min {data['load']['min']}, max {data['load']['max']}; "
          f"torch threads {torch_threads} (fine-tunes inside run_search: "
          f"{data['demo']['config']['train_threads']}), ONNX Runtime threads 1")
    write_json(RESULTS / "search_demo.json", data)
    print(f"wrote {write_markdown(data)} and search_demo.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
