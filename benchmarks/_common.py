"""Shared helpers for the benchmark scripts: machine state, thread choice, tables, files.

Every benchmark output states the thread counts and the machine load it was measured
under (design rule 6): the machines here are shared, and a figure without its conditions
cannot be compared with anything.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Each search process pinned to one core's worth of BLAS/OpenMP threads (the benchmarks that
# run two searches at once, one per core)
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                     "OPENBLAS_NUM_THREADS": "1"}
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` without installing
    sys.path.insert(0, str(REPO))

from autocompress.runtime import cpu  # noqa: E402 - after the sys.path fix above

# -- machine state --------------------------------------------------------------------------


def cpu_model() -> str:
    return cpu.cpu_model()  # the same name the search records with every latency


def cpu_flags() -> list[str]:
    """The SIMD flags that decide ONNX Runtime's int8 kernels (VNNI or not)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def choose_torch_threads(requested: int | None) -> int:
    """PyTorch intra-op threads for training/export in this process.

    OpenMP worker threads spin at barriers: on a 2-core machine that other processes keep
    busy, 2 threads made a ResNet-20 batch-32 forward+backward 9x slower than 1 thread
    (7.2 s vs 0.8 s at load average 10). Default: every core when the machine is idle enough
    for them, else 1. The choice is recorded in every output.
    """
    import torch

    cores = os.cpu_count() or 1
    if requested is not None:
        threads = max(1, int(requested))
    else:
        threads = cores if load_average()[0] < cores - 0.5 else 1
    torch.set_num_threads(threads)
    return threads


def git_state() -> str:
    """Commit of the checkout and whether the package has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "autocompress"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted package changes' if dirty else ''}" if head else "unknown"


def machine_state(*, ort_threads: int, torch_threads: int) -> dict[str, Any]:
    """Conditions of a measurement, for the JSON and the headers of the tables."""
    import onnxruntime
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "load_average_1_5_15": [round(v, 2) for v in load_average()],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "ort_intra_op_threads": ort_threads,
        "torch_threads": torch_threads,
        "latency_batch_size": 1,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_state(),
    }


def state_line(state: dict[str, Any]) -> str:
    load = state["load_average_1_5_15"]
    flags = ",".join(state["cpu_flags"]) or "none"
    return (
        f"{state['cpu']} ({state['cpu_count']} cores, flags {flags}); ONNX Runtime "
        f"{state['onnxruntime']} with {state['ort_intra_op_threads']} intra-op thread(s), batch "
        f"{state['latency_batch_size']}; torch {state['torch']} with {state['torch_threads']} "
        f"thread(s); load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) "
        f"at {state['time']}" + (f"; package at {state['git']}" if state.get("git") else "")
    )


def cpu_jiffies() -> tuple[int, int] | None:
    """(stolen, total) CPU time since boot from /proc/stat, in jiffies; None off Linux.

    Steal is time the hypervisor gave this VM's virtual CPUs to someone else: it slows every
    figure down without showing in the load average. (A one-shot `top -bn1` showed 25% here
    once; its first frame is not a measurement. Over the 70-minute CIFAR-10 run: 0%.)"""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (values[7] if len(values) > 7 else 0), sum(values)


class LoadSampler:
    """Load average sampled at chosen moments: start, end and per phase, with min/max, and
    the share of CPU time stolen by the hypervisor between creation and summary."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float]] = []
        self._jiffies = cpu_jiffies()

    def mark(self, label: str) -> float:
        value = round(load_average()[0], 2)
        self.samples.append((label, value))
        return value

    def summary(self) -> dict[str, Any]:
        values = [v for _, v in self.samples]
        summary: dict[str, Any] = {
            "samples": [{"at": label, "load_1min": v} for label, v in self.samples],
            "min": min(values, default=math.nan),
            "max": max(values, default=math.nan),
        }
        now = cpu_jiffies()
        if self._jiffies is not None and now is not None and now[1] > self._jiffies[1]:
            stolen = now[0] - self._jiffies[0]
            summary["steal_percent"] = round(100 * stolen / (now[1] - self._jiffies[1]), 1)
        return summary


def steal_text(load: dict[str, Any]) -> str:
    """", 12% of CPU time stolen by the hypervisor" when the run recorded it, else ""."""
    steal = load.get("steal_percent")
    return "" if steal is None else f", {steal:.0f}% of CPU time stolen by the hypervisor"


# -- formatting ------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{int(n)} B"


def fmt_ms(median: float | None, spread: float | None = None) -> str:
    if median is None:
        return "-"
    digits = 3 if median < 1 else 2 if median < 10 else 1
    if spread is None:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ± {spread:.{digits}f}"


def fmt_flops(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    return f"{n / 1e6:.1f} M"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width table for the terminal."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for k, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("MET" if flag else "MISSED")


# -- trial timing ----------------------------------------------------------------------------


class FinetuneProbe:
    """Wraps ``autocompress.train.distill.finetune`` to time its evaluate callbacks apart from the
    forward/backward steps. Keyed by the seed the objective passes (config.seed + trial)."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, float]] = {}
        self._original: Callable[..., Any] | None = None

    def install(self) -> None:
        from autocompress.train import distill

        self._original = distill.finetune
        original = self._original

        def timed(student: Any, teacher: Any, data: Any, plan: Any, **kwargs: Any) -> Any:
            spent = [0.0, 0]
            evaluate = kwargs.get("evaluate")
            if evaluate is not None:
                def timed_evaluate(model: Any) -> float:
                    start = time.perf_counter()
                    try:
                        return evaluate(model)
                    finally:
                        spent[0] += time.perf_counter() - start
                        spent[1] += 1

                kwargs["evaluate"] = timed_evaluate
            start = time.perf_counter()
            result = original(student, teacher, data, plan, **kwargs)
            total = time.perf_counter() - start
            self.calls[int(kwargs.get("seed", -1))] = {
                "call_s": total,
                "evaluate_s": spent[0],
                "evaluations": spent[1],
                "train_s": total - spent[0],
                "steps": result.steps,
            }
            return result

        distill.finetune = timed

    def uninstall(self) -> None:
        from autocompress.train import distill

        if self._original is not None:
            distill.finetune = self._original


# -- study reading ---------------------------------------------------------------------------


def trial_rows(storage_url: str, study_name: str, seed: int,
               probe: FinetuneProbe) -> list[dict[str, Any]]:
    """Every trial with its Optuna duration, phase timing and the probe's split."""
    from autocompress import study as study_mod

    study = study_mod.load_existing_study(storage_url, study_name)
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        timing = json.loads(a["timing"]) if isinstance(a.get("timing"), str) else {}
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "baseline": a.get("baseline"),
            "rejected": a.get("rejected"),
            "early_stopped": a.get("early_stopped"),
            "fail_reason": a.get("fail_reason"),
            "plan_summary": a.get("plan_summary"),
            "accuracy": a.get("accuracy"),
            "test_accuracy": a.get("test_accuracy"),
            "size_bytes": a.get("size_bytes"),
            "latency_ms": a.get("latency_ms"),
            "latency_spread_ms": a.get("latency_spread_ms"),
            "latency_vs_fp32": a.get("latency_vs_fp32"),
            "feasible": a.get("feasible"),
            "duration_s": duration,
            "timing": timing,
            "finetune_probe": probe.calls.get(seed + t.number),
        })
    return rows


def overhead(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """1 - fine-tune share, per fine-tuned trial and over the whole search."""
    tuned = [r for r in rows if "finetune" in r["timing"] and r["duration_s"]]
    if not tuned:
        return {"fine_tuned_trials": 0}
    dur = sum(r["duration_s"] for r in tuned)
    coarse = sum(r["timing"]["finetune"] for r in tuned)
    strict = sum(r["finetune_probe"]["train_s"] for r in tuned if r["finetune_probe"])
    evals = sum(r["finetune_probe"]["evaluate_s"] for r in tuned if r["finetune_probe"])
    per_trial = [1 - r["finetune_probe"]["train_s"] / r["duration_s"]
                 for r in tuned if r["finetune_probe"]]
    phases: dict[str, float] = {}
    for r in tuned:
        for k, v in r["timing"].items():
            phases[k] = phases.get(k, 0.0) + v
    all_train = sum(r["finetune_probe"]["train_s"] for r in rows if r["finetune_probe"])
    return {
        "fine_tuned_trials": len(tuned),
        "trial_seconds": round(dur, 2),
        "finetune_phase_seconds": round(coarse, 2),
        "forward_backward_seconds": round(strict, 2),
        "evaluate_seconds_inside_finetune": round(evals, 2),
        "coarse": 1 - coarse / dur,
        "strict": 1 - strict / dur,
        "strict_median_per_trial": statistics.median(per_trial) if per_trial else None,
        "whole_search": 1 - all_train / wall_s,
        "phase_share_of_trial_time": {k: v / dur for k, v in phases.items()},
        "unaccounted_share": 1 - sum(phases.values()) / dur,
    }


def progress_printer(loads: LoadSampler) -> Callable[[Any], None]:
    def show(p: Any) -> None:
        r = p.last
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        what = r.baseline or ("rejected" if r.rejected else r.state.lower())
        print(
            f"  [{p.done:>2}/{p.total}] #{r.number:<3} {what:<9} {r.plan_summary[:38]:<38} "
            f"acc {acc} size {fmt_bytes(r.size_bytes):>9} lat {fmt_ms(r.latency_ms):>6} ms "
            f"elapsed {p.elapsed_s:6.1f} s load {loads.mark(f'trial {r.number}'):.1f}",
            flush=True,
        )

    return show


# -- the shared ResNet-20 / CIFAR-10 task ---------------------------------------------------

TEACHER = REPO.parent / "shared" / "models" / "resnet20-cifar10.pt"
MODEL_SPEC = "autocompress.zoo:resnet20"


def resnet20_task(demo: bool, say: Callable[[str], None]) -> tuple[Any, Any, Any]:
    """(model spec, weights, data spec) of the shared ResNet-20 teacher on CIFAR-10 (unpacked
    when needed), or the built-in digits demo's (None, None, None) for smoke runs."""
    if demo:
        return None, None, None
    sys.path.insert(0, str(Path(__file__).parent))
    from cifar10 import data as cdata

    say(f"data: {cdata.ensure_cifar()}")
    return MODEL_SPEC, str(TEACHER), f"imagefolder:{cdata.root()}"


def start_benchmark(name: str, torch_threads: int | None,
                    say: Callable[[str], None]) -> tuple[int, LoadSampler, dict[str, Any]]:
    """Quiet library warnings, choose torch threads, start the load sampler and say the
    machine's state: (threads, sampler, state)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="optuna")
    threads = choose_torch_threads(torch_threads)
    loads = LoadSampler()
    loads.mark("start")
    state = machine_state(ort_threads=1, torch_threads=threads)
    say(f"{name} benchmark: {state_line(state)}")
    return threads, loads, state


def run_arms(
    arms: Sequence[str],
    seeds: Sequence[int],
    minutes: float,
    run_one: Callable[[str, int], dict[str, Any]],
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Every arm at every seed, one after the other (arms alternate within a seed, so drift
    hits each alike); returns the runs and each arm's hypervolume mean, min and max."""
    runs = []
    for seed in seeds:
        for arm in arms:
            say(f"== {arm} seed {seed}: {minutes:g} min")
            runs.append(run_one(arm, seed))
            say(f"   hypervolume {runs[-1]['hypervolume']:.4f}")
    by_arm = {arm: [r["hypervolume"] for r in runs if r["arm"] == arm] for arm in arms}
    summary = {arm: {"mean": statistics.mean(v), "min": min(v), "max": max(v)}
               for arm, v in by_arm.items()}
    return runs, summary


def study_place(folder: Path, name: str, *, fresh: bool = True) -> dict[str, str]:
    """SearchConfig fields for a benchmark study kept in ``folder`` (study name, SQLite
    storage, artifact folder); ``fresh`` deletes a previous run's database and lock first."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / f"{name}.db"
    if fresh:
        for stale in (db, db.with_name(db.name + ".lock")):
            stale.unlink(missing_ok=True)
    return {"study": name, "storage": f"sqlite:///{db}",
            "artifacts": str(folder / f"{name}-artifacts")}
