"""ResNet-20 / CIFAR-10 on the executorch-xnnpack target (issue 34).

(Not named executorch.py: run as a script, that name would shadow the executorch package.)

    python benchmarks/executorch_target.py                    # 10-minute search, full test set
    python benchmarks/executorch_target.py --minutes 1 --demo --test-limit 200   # smoke run

A short search with ``--target executorch-xnnpack`` on the shared ResNet-20 teacher, then three
of its ExecuTorch programs (``.pte``, XNNPACK backend) re-measured side by side in this
process: the fp32 program (the fp32 baseline), the int8 PTQ program (the int8-ptq baseline)
and the best searched plan (the fastest searched trial within 1 point of the fp32 validation
accuracy; the most accurate one when none is). Each is timed interleaved, round by round,
against the fp32 ``.pte`` on ExecuTorch and against the fp32 ONNX file on ONNX Runtime (same
threads, batch 1), and scored on the test split by ExecuTorch's runtime. Writes
benchmarks/results/executorch.md and .json (with the CPU, its flags and the load average).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    md_table,
    resnet20_task,
    start_benchmark,
    state_line,
    study_place,
    write_json,
    write_text,
)

TARGET = "executorch-xnnpack"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="search wall time (default 10)")
    p.add_argument("--demo", action="store_true", help="the digits demo instead of CIFAR-10")
    p.add_argument("--test-limit", type=int, default=None,
                   help="score on the first N test images only (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    p.add_argument("--repeats", type=int, default=30, help="runs a side per round")
    p.add_argument("--out", default=str(RESULTS / "executorch"), help="result path stem")
    return p.parse_args(argv)


def _search(args: argparse.Namespace, folder: Path, say: Any) -> Any:
    from autocompress.config.options import SearchConfig
    from autocompress.search.loop import run_search

    model, weights, data = resnet20_task(args.demo, say)
    config = SearchConfig(model=model, weights=weights, data=data, target=TARGET,
                          threads=args.threads, time_limit=args.minutes, trials=10_000,
                          budgets=(), **study_place(folder, "executorch"))
    say(f"search: {args.minutes:g} min on {TARGET}")
    return run_search(config), (model, weights, data)


def _chosen(records: list[Any]) -> dict[str, Any]:
    """fp32 and int8 PTQ baselines, and the best searched plan (see the module docstring)."""
    measured = [r for r in records if r.measured]
    by_baseline = {r.baseline: r for r in measured if r.baseline}
    fp32 = by_baseline["fp32"]
    searched = [r for r in measured if r.baseline is None and r.latency_vs_fp32]
    close = [r for r in searched if (r.accuracy or 0) >= (fp32.accuracy or 0) - 0.01]
    best = (min(close, key=lambda r: r.latency_vs_fp32) if close
            else max(searched, key=lambda r: r.accuracy or 0, default=None))
    return {"fp32": fp32, "int8 PTQ": by_baseline.get("int8-ptq"), "best searched": best}


def _fetch(result: Any, record: Any, folder: Path) -> tuple[Path, Path]:
    """The trial's program and ONNX file from the study's artifact store."""
    from autocompress import study as study_mod
    from autocompress.runtime import executorch as executorch_runtime

    store = study_mod.artifact_store(result.artifacts_dir)
    onnx_path = folder / f"trial-{record.number}.onnx"
    pte = executorch_runtime.program_path(onnx_path)
    if not pte.is_file():  # the fp32 pair is fetched once, as the reference and as a row
        study_mod.download(store, record.attrs["artifact_id"], onnx_path)
        study_mod.download(store, record.attrs[executorch_runtime.ARTIFACT_ID_ATTR], pte)
    return pte, onnx_path


def _median_run_ms(session: Any, feed: dict[str, Any], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def _ratios(pte: Path, fp32_pte: Path, fp32_onnx: Path, shape: tuple[int, ...],
            args: argparse.Namespace) -> dict[str, Any]:
    """The program vs the fp32 program (ExecuTorch) and vs the fp32 ONNX file (ONNX Runtime),
    all three alternated round by round in this process: the medians of per-round ratios."""
    from autocompress.runtime import sessions, timing

    opened = {
        "cand": sessions.make_session(pte, threads=args.threads, target=TARGET),
        "fp32_pte": sessions.make_session(fp32_pte, threads=args.threads, target=TARGET),
        "fp32_ort": sessions.make_session(fp32_onnx, threads=args.threads),
    }
    feeds = {k: timing.random_input(s, shape) for k, s in opened.items()}
    for k, s in opened.items():
        _median_run_ms(s, feeds[k], 10)  # warm-up
    per_round: dict[str, list[float]] = {k: [] for k in opened}
    for r in range(args.rounds):
        order = list(opened) if r % 2 == 0 else list(reversed(opened))
        for k in order:
            per_round[k].append(_median_run_ms(opened[k], feeds[k], args.repeats))
    vs_pte = [c / f for c, f in zip(per_round["cand"], per_round["fp32_pte"], strict=True)]
    vs_ort = [c / f for c, f in zip(per_round["cand"], per_round["fp32_ort"], strict=True)]
    return {"ms": statistics.median(per_round["cand"]),
            "fp32_pte_ms": statistics.median(per_round["fp32_pte"]),
            "fp32_ort_ms": statistics.median(per_round["fp32_ort"]),
            "vs_fp32_pte": statistics.median(vs_pte), "vs_fp32_ort": statistics.median(vs_ort),
            "vs_fp32_pte_rounds": vs_pte, "vs_fp32_ort_rounds": vs_ort}


def _test_accuracy(pte: Path, task: Any, limit: int | None, threads: int) -> tuple[float, int]:
    from autocompress.runtime import scoring

    batches, taken = [], 0
    for x, y in task.data.batches("test", 256):
        if limit is not None:
            x, y = x[: limit - taken], y[: limit - taken]
        batches.append((x, y))
        taken += len(y)
        if limit is not None and taken >= limit:
            break
    accuracy = scoring.onnx_accuracy(pte, batches, threads=max(threads, 2), target=TARGET,
                                     metric=task.metric)
    return accuracy, taken


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    say = print
    from autocompress.runtime import executorch as executorch_runtime

    reason = executorch_runtime.unavailable_reason()
    if reason is not None:
        print(f"error: {reason}: pip install -e '.[executorch]'", file=sys.stderr)
        return 2
    _, loads, state = start_benchmark("executorch", None, say)
    state["executorch"] = executorch_runtime.version()
    state["runtime_threads"] = args.threads
    with tempfile.TemporaryDirectory(prefix="bench-executorch-") as tmp:
        folder = Path(tmp)
        result, (model, weights, data) = _search(args, folder, say)
        from autocompress import intake

        task = intake.load_task(model, weights, data)
        chosen = _chosen(result.records)
        fp32_pte, fp32_onnx = _fetch(result, chosen["fp32"], folder)
        shape = (1, *task.input_shape)
        rows: dict[str, Any] = {}
        for name, record in chosen.items():
            if record is None:
                say(f"{name}: none measured in {args.minutes:g} min (give the search longer)")
                continue
            pte, _ = _fetch(result, record, folder)
            accuracy, images = _test_accuracy(pte, task, args.test_limit, args.threads)
            rows[name] = {"trial": record.number, "plan": record.attrs.get("plan_summary"),
                          "bytes": pte.stat().st_size, "test_accuracy": accuracy,
                          "test_images": images,
                          "recorded_test_accuracy": record.test_accuracy,
                          "weight_types": record.json_attr("weight_types"),
                          "program": record.json_attr(executorch_runtime.PROGRAM_ATTR),
                          **_ratios(pte, fp32_pte, fp32_onnx, shape, args)}
            say(f"{name}: {rows[name]['vs_fp32_pte']:.3f}x fp32 .pte, "
                f"{rows[name]['vs_fp32_ort']:.3f}x ORT fp32, test {accuracy:.4f}")
    loads.mark("end")
    state["load_during"] = loads.summary()
    _write(Path(args.out), args, state, rows, len(result.records))
    return 0


def _write(stem: Path, args: argparse.Namespace, state: dict[str, Any],
           rows: dict[str, Any], trials: int) -> None:
    headers = ["program", "trial", "x fp32 .pte", "x ORT fp32", "ms", "test acc", "bytes",
               "weights"]
    table = [[name, r["trial"], f"{r['vs_fp32_pte']:.3f}", f"{r['vs_fp32_ort']:.3f}",
              f"{r['ms']:.3f}", f"{r['test_accuracy']:.4f}", r["bytes"],
              ",".join(sorted(set((r["weight_types"] or {}).values())))]
             for name, r in rows.items()]
    fp32 = rows.get("fp32", {})
    text = (
        f"# ExecuTorch XNNPACK target: ResNet-20 / CIFAR-10{' (digits demo)' if args.demo else ''}"
        f"\n\n`python benchmarks/executorch_target.py --minutes {args.minutes:g}"
        f"{' --demo' if args.demo else ''}"
        f"{f' --test-limit {args.test_limit}' if args.test_limit else ''}`: a "
        f"{args.minutes:g}-minute search on `{TARGET}` ({trials} trials), then each program "
        f"timed in this process, {args.rounds} interleaved rounds of {args.repeats} runs, "
        f"{args.threads} thread(s), batch 1; ratios are medians of per-round ratios. fp32 "
        f".pte {fp32.get('fp32_pte_ms', float('nan')):.3f} ms, ONNX Runtime fp32 "
        f"{fp32.get('fp32_ort_ms', float('nan')):.3f} ms.\n\n"
        f"{md_table(headers, table)}\n\nMachine: {state_line(state)}; ExecuTorch "
        f"{state.get('executorch')}.\n"
    )
    write_text(stem.with_suffix(".md"), text)
    write_json(stem.with_suffix(".json"), {"args": vars(args), "state": state, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
