"""ResNet-20 on CIFAR-10: hand recipes vs random and TPE searches, plus a latency-bound case.

    python benchmarks/cifar10.py --train-only [--quick]   # train + cache the teacher only
    python benchmarks/cifar10.py --quick                  # < 15 min on 2 cores (teacher cached)
    python benchmarks/cifar10.py                          # default, < 90 min (teacher cached)

Data: ``../shared/datasets/cifar10-jpeg.tar.gz`` unpacked to ~/.cache/cifar10 (else
torchvision's download), read as ``imagefolder:~/.cache/cifar10`` by ``intake.load_data``:
fine-tune split = official train minus a stratified 10% validation split, official test kept
apart. Teacher: ``autocompress.zoo:resnet20`` trained once and cached at
``<cache>/resnet20-cifar10.pt`` (see cifar10/teacher.py).

Recipes (fp32, int8 PTQ, int4-weight PTQ, 50% L1 channel pruning + KD, int8 QAT + KD) are
run through the package's TrialRunner, i.e. measured exactly like search trials; searches
with the random and TPE samplers get equal trial counts and fine-tune budgets and the same
seeds. Writes benchmarks/results/cifar10.md, cifar10.json and cifar10_pareto.png (--quick:
cifar10_quick.md, .json and _pareto.png, so a quick check never overwrites the full run).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    RESULTS,
    FinetuneProbe,
    LoadSampler,
    choose_torch_threads,
    fmt_bytes,
    machine_state,
    overhead,
    progress_printer,
    state_line,
    text_table,
    trial_rows,
    write_json,
    write_text,
)

# Fine-tune learning rate (AdamW, the package's fine-tune optimizer). Measured here on the
# BN-folded ResNet-20 teacher (20 KD steps, batch 64, 1000 val images, int8 QAT unless noted):
#   AdamW 2e-3: 0.757 -> 0.102 after 5 steps, 0.170 after 20 (fp32 student: 0.205)
#   AdamW 5e-4: 0.757 -> 0.618 after 5 steps, 0.726 after 20
#   AdamW 2e-4: 0.757 -> 0.714 after 5 steps, 0.751 after 20
#   SGD-N 2e-3: 0.757 -> 0.760 after 5 steps, 0.755 after 20
# The study config's 2e-3 collapses every candidate (first quick run: every search trial
# early-stopped, int8 QAT + KD at chance; kept in results/cifar10_quick_lr0.002.*).
LEARNING_RATE = 2e-4
MODES: dict[str, dict[str, Any]] = {
    # quick: 1 seed, few trials, short fine-tunes: a smoke-scale run of every part.
    "quick": {"trials": 6, "seeds": [0], "finetune_steps": 40, "batch_size": 64,
              "learning_rate": LEARNING_RATE, "latency_repeats": 30, "lat_trials": 3,
              "lat_steps": 2},
    # full: 150 steps x 128 images (~0.4 epoch) per fine-tune, 12 trials per sampler (TPE
    # models after trials // 3 = 4 random start-up trials). Projected from the quick run's
    # per-trial costs: ~2 min per trial at 2 torch threads, ~50 min of searches + ~6 min of
    # recipes + ~3 min latency scenario: inside 90 with the teacher cached.
    "full": {"trials": 12, "seeds": [0], "finetune_steps": 150, "batch_size": 128,
             "learning_rate": LEARNING_RATE, "latency_repeats": 60, "lat_trials": 8,
             "lat_steps": 4},
}
MODEL_SPEC = "autocompress.zoo:resnet20"
SAMPLERS = ("random", "tpe")
HV_REFERENCE_ACCURACY = 0.1  # chance on 10 classes
STEMS = {"full": "cifar10", "quick": "cifar10_quick"}  # results file names per mode
TARGET_QUICK_S = 15 * 60
TARGET_FULL_S = 90 * 60
STUDIES = REPO / "benchmarks" / "cache" / "cifar10"  # gitignored: study DBs + artifacts


def log(msg: str) -> None:
    print(msg, flush=True)


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# -- parts -------------------------------------------------------------------------------------


def get_teacher(data: Any, mode: str, cache: Path, retrain: bool,
                epochs: int | None = None) -> dict[str, Any]:
    from cifar10 import teacher

    epochs = teacher.EPOCHS[mode] if epochs is None else epochs
    meta = teacher.read_meta(cache)
    why = "--retrain" if retrain else teacher.usable(meta, data.split_sha256(), epochs)
    if why is None and meta is not None:
        log(f"teacher: cached {teacher.teacher_path(cache)} ({meta['epochs']} epochs, test "
            f"{meta['test_accuracy_torch']:.4f})")
        return {**meta, "path": str(teacher.teacher_path(cache)), "trained_now": False}
    log(f"teacher: training {epochs} epochs ({why})")
    model, meta = teacher.train(data, epochs, log=log)
    meta["split_sha256"] = data.split_sha256()
    path = teacher.save(model, meta, cache)
    log(f"teacher: saved {path}; val {meta['val_accuracy_torch']:.4f}, test "
        f"{meta['test_accuracy_torch']:.4f} (PyTorch) in {meta['train_seconds'] / 60:.1f} min")
    return {**meta, "path": str(path), "trained_now": True}


def base_config(settings: dict[str, Any], teacher_file: str, spec: str,
                train_threads: int) -> Any:
    from autocompress.config.options import SearchConfig

    return SearchConfig(
        model=MODEL_SPEC, weights=teacher_file, data=spec, study="cifar10",
        objectives=("accuracy", "size"), bits=(32, 8, 4), prune_max=0.6, prune_step=0.05,
        finetune_steps=settings["finetune_steps"], learning_rate=settings["learning_rate"],
        batch_size=settings["batch_size"], threads=1, latency_batch_size=1,
        latency_repeats=settings["latency_repeats"], trials=settings["trials"],
        baselines=False, device="cpu", train_threads=train_threads,
    )


def run_recipes(task: Any, config: Any, workdir: Path, probe: FinetuneProbe
                ) -> dict[str, dict[str, Any]]:
    from cifar10 import trials

    # Hand recipes are fixed choices: no early stop (a drop of 1.0 never triggers).
    recipe_cfg = config.replace(early_stop_drop=1.0)
    ctx = trials.make_context(task, recipe_cfg, workdir)
    ptq_ctx = trials.with_config(ctx, recipe_cfg.replace(finetune_steps=0))
    plans = [
        ("fp32", ctx, trials.uniform(ctx, bits=32), "fp32"),
        ("int8-ptq", ctx, trials.uniform(ctx, bits=8), "int8-ptq"),
        ("int4-ptq", ptq_ctx, trials.uniform(ptq_ctx, bits=4), None),
        ("prune50-kd", ctx, trials.uniform(ctx, bits=32, ratio=0.5), None),
        ("int8-qat-kd", ctx, trials.uniform(ctx, bits=8), None),
    ]
    out: dict[str, dict[str, Any]] = {}
    for number, (name, c, plan, baseline) in enumerate(plans):
        probe.calls.clear()
        attrs = trials.run_fixed(c, plan, number=number, baseline=baseline)
        attrs["finetune_probe"] = probe.calls.get(c.training.seed + number)
        attrs["recipe"] = {
            "fp32": "fp32 ONNX export (the search's fp32 baseline)",
            "int8-ptq": "uniform int8 PTQ: ORT static quantization (QDQ, per-channel, "
                        "calibrated on 8x32 train images; the search's int8-ptq baseline)",
            "int4-ptq": "uniform int4-weight PTQ: product exporter, per-channel max-abs int4 "
                        "weights, uint8 activations from observers on 8x32 train images, "
                        "no fine-tune",
            "prune50-kd": "uniform 50% L1 channel pruning (round to 8) + KD fine-tune, fp32",
            "int8-qat-kd": "uniform int8 QAT + KD fine-tune",
        }[name]
        out[name] = attrs
        log(f"  recipe {name:<12} val {_f(attrs.get('accuracy'))} test "
            f"{_f(attrs.get('test_accuracy'))} size {fmt_bytes(attrs.get('size_bytes'))} latency "
            f"{_f(attrs.get('latency_ms'), 3)} ms (x{_f(attrs.get('latency_vs_fp32'), 2)}) in "
            f"{attrs['duration_s']:.0f} s" + (f" ERROR {attrs['error']}" if attrs["error"] else ""))
    return out


def run_one_search(config: Any, loads: LoadSampler, probe: FinetuneProbe,
                   fp32_size: float) -> dict[str, Any]:
    from autocompress.results import pareto
    from autocompress.search.loop import run_search

    db = STUDIES / f"{config.study}.db"
    for old in (db, db.with_name(db.stem + "-artifacts"), db.with_name(db.name + ".lock")):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    url = f"sqlite:///{db}"
    config = config.replace(storage=url)
    probe.calls.clear()
    started = time.perf_counter()
    result = run_search(config, on_progress=progress_printer(loads))
    wall = time.perf_counter() - started
    rows = trial_rows(url, config.study, config.seed, probe)
    flops = {r.number: r.flops for r in result.records}
    front = []
    for r in result.front:
        front.append({
            "number": r.number, "plan_summary": r.plan_summary, "accuracy": r.accuracy,
            "test_accuracy": r.test_accuracy, "size_bytes": r.size_bytes,
            "times_smaller": fp32_size / r.size_bytes if r.size_bytes else None,
            "latency_ms": r.latency_ms, "latency_spread_ms": r.latency_spread_ms,
            "latency_vs_fp32": r.latency_vs_fp32, "flops": flops.get(r.number),
            "plan": r.plan,
        })
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    for row in rows:
        row["flops"] = flops.get(row["number"])
    return {
        "sampler": config.sampler,
        "seed": config.seed,
        "study": config.study,
        "storage": url,
        "trials": rows,
        "trials_total": len(rows),
        "states": states,
        "hypervolume": pareto.hypervolume_2d(
            result.records, fp32_size * 1.1, HV_REFERENCE_ACCURACY
        ),
        "front": front,
        "wall_s": wall,
        "overhead": overhead(rows, wall),
    }


def latency_scenario(settings: dict[str, Any], loads: LoadSampler, probe: FinetuneProbe
                     ) -> dict[str, Any]:
    """torchvision resnet18 at 224x224 under a budget of 60% of its fp32 ORT latency."""
    from cifar10 import data as cdata

    from autocompress import intake
    from autocompress.config.options import SearchConfig
    from autocompress.runtime import timing
    from autocompress.search.loop import run_search
    from autocompress.transform import quantize

    spec = f"{Path(cdata.__file__).resolve()}:latency_subset"
    task = intake.load_task("torchvision:resnet18", None, spec, num_classes=10, input_size=224)
    sizes = {n: len(task.data.split(n)) for n in ("train", "val", "test")}
    STUDIES.mkdir(parents=True, exist_ok=True)
    fp32 = quantize.export_float_onnx(task.model, task.data.example_input(1),
                                      STUDIES / "resnet18-fp32.onnx")
    stats = timing.time_latency(fp32, (1, 3, 224, 224), threads=1, repeats=30, warmup=5)
    budget_ms = 0.6 * stats.median_ms
    budget_text = f"{budget_ms:.2f}ms"
    log(f"  resnet18 fp32 {stats.median_ms:.1f} ms (IQR {stats.spread_ms:.1f}); budget "
        f"{budget_text}")
    db = STUDIES / "resnet18-latency.db"
    for old in (db, db.with_name(db.stem + "-artifacts")):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    config = SearchConfig(
        model="torchvision:resnet18", data=spec, num_classes=10, input_size=224,
        study="resnet18-latency", storage=f"sqlite:///{db}", budgets=(budget_text,),
        objectives=("accuracy", "size", "latency"), trials=settings["lat_trials"],
        finetune_steps=settings["lat_steps"], batch_size=8, threads=1,
        latency_repeats=15, device="cpu", train_threads=settings["train_threads"],
    )
    probe.calls.clear()
    started = time.perf_counter()
    error = None
    try:
        run_search(config, on_progress=progress_printer(loads))
    except Exception as exc:  # e.g. BudgetError: a finding to report
        error = f"{type(exc).__name__}: {exc}"
        log(f"  latency search stopped: {error}")
    wall = time.perf_counter() - started
    rows = trial_rows(config.storage_url(), config.study, config.seed, probe) \
        if db.exists() else []
    under = [r for r in rows if r["feasible"] and not r["rejected"] and r["accuracy"] is not None
             and r["state"] == "COMPLETE"]
    rejected = [r for r in rows if r["rejected"]]
    closest = max((r["latency_ms"] / budget_ms for r in under), default=None)
    times = [r["duration_s"] for r in rejected if r["duration_s"]]
    return {
        "data_note": f"{sizes['train']}/{sizes['val']}/{sizes['test']} real CIFAR-10 images "
                     "(train/val/test) stored 32x32 and resized to 224 at preprocessing",
        "fp32_latency": stats.to_dict(),
        "budget_ms": budget_ms,
        "budget_text": budget_text,
        "config": config.to_dict(),
        "error": error,
        "wall_s": wall,
        "trials": rows,
        "under_budget": len(under),
        "closest_ratio": closest,
        "rejected": len(rejected),
        "rejection_median_s": statistics.median(times) if times else None,
        "rejection_max_s": max(times) if times else None,
        "rejected_with_finetune": [r["number"] for r in rejected if "finetune" in r["timing"]],
    }


# -- targets -----------------------------------------------------------------------------------


def phase_summary(searches: list[dict[str, Any]]) -> dict[str, Any]:
    tuned = [t for s in searches for t in s["trials"]
             if "finetune" in t["timing"] and t["duration_s"]]
    if not tuned:
        return {"trials": 0}
    n = len(tuned)
    order = ["build", "precheck", "finetune", "export", "measure"]
    keys = sorted({k for t in tuned for k in t["timing"]},
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    mean = {k: sum(t["timing"].get(k, 0.0) for t in tuned) / n for k in keys}
    mean_trial = sum(t["duration_s"] for t in tuned) / n
    mean["other (sampler, storage, upload)"] = mean_trial - sum(mean.values())
    probes = [t["finetune_probe"] for t in tuned if t["finetune_probe"]]
    return {
        "trials": n,
        "mean_trial_s": mean_trial,
        "mean_s": mean,
        "mean_forward_backward_s": sum(p["train_s"] for p in probes) / max(1, len(probes)),
        "mean_evaluate_s": sum(p["evaluate_s"] for p in probes) / max(1, len(probes)),
    }


def _dominates(f: dict[str, Any], r: dict[str, Any]) -> bool:
    return f["accuracy"] >= r["accuracy"] and f["size_bytes"] <= r["size_bytes"]


def targets(data: dict[str, Any], demo_json: Path) -> list[list[str]]:
    from cifar10.report import status_row

    fp32 = data["recipes"]["fp32"]
    acc0, size0 = fp32["accuracy"], fp32["size_bytes"]
    out = []
    # 1. <= 1 pt below fp32, >= 8x smaller, at least as fast (all search trials measured)
    pool = [t for s in data["searches"] for t in s["trials"]
            if t["state"] == "COMPLETE" and not t["rejected"] and t["accuracy"] is not None]
    hits = [t for t in pool if t["accuracy"] >= acc0 - 0.01 and t["size_bytes"] * 8 <= size0
            and (t["latency_vs_fp32"] or 9) <= 1.0]
    within = [t for t in pool if t["accuracy"] >= acc0 - 0.01]
    best_small = max(within, key=lambda t: size0 / t["size_bytes"], default=None)
    eight = [t for t in pool if t["size_bytes"] * 8 <= size0]
    best_eight = max(eight, key=lambda t: t["accuracy"], default=None)
    if hits:
        h = max(hits, key=lambda t: size0 / t["size_bytes"])
        measured = (f"trial #{h['number']}: {size0 / h['size_bytes']:.1f}x smaller, "
                    f"{100 * (h['accuracy'] - acc0):+.2f} pt, x{h['latency_vs_fp32']:.2f} latency")
        out.append(status_row("<= 1 pt below fp32 with >= 8x smaller and as fast", measured, True))
    else:
        parts = []
        if best_small:
            parts.append(f"largest reduction within 1 pt: {size0 / best_small['size_bytes']:.1f}x"
                         f" (#{best_small['number']}, {100 * (best_small['accuracy'] - acc0):+.2f}"
                         f" pt, x{best_small['latency_vs_fp32']:.2f} latency)")
        if best_eight:
            parts.append(f"best >= 8x: {100 * (best_eight['accuracy'] - acc0):+.2f} pt "
                         f"(#{best_eight['number']}, x{best_eight['latency_vs_fp32']:.2f} latency)")
        int4 = data["recipes"].get("int4-ptq", {})
        why = ("no measured candidate is >= 8x smaller, within 1 pt and as fast as fp32; "
               + "; ".join(parts or ["no candidate within 1 pt"]) + ". ")
        all_trials = [t for s in data["searches"] for t in s["trials"]]
        stopped = [t for t in all_trials if t["state"] == "PRUNED"]
        p50 = data["recipes"].get("prune50-kd", {})
        if stopped or p50.get("accuracy") is not None:
            pruning = [t for t in all_trials if "prune" in (t.get("plan_summary") or "")]
            why += (f"{len(stopped)} of the {len(all_trials)} search trials were early-stopped "
                    f"(below teacher - 0.25 at half-way) and {len(pruning)} of the "
                    f"{len(all_trials)} prune channels; the uniform 50%-pruned recipe reached "
                    f"{p50.get('accuracy', 0):.3f} after BN re-estimation and the same "
                    f"{data['settings']['finetune_steps']}-step fine-tune: structured pruning of "
                    "ResNet-20 needs a longer repair than this budget. ")
        if int4.get("latency_vs_fp32"):
            why += (f"int4 weights alone reach {size0 / int4['size_bytes']:.1f}x at "
                    f"x{int4['latency_vs_fp32']:.2f} latency (weights dequantized at run time, "
                    "no VNNI/int4 kernels here), so 8x needs int4 plus pruning and fp32 speed "
                    "needs pruning; the figures above show how far this run's fine-tune budget "
                    "got. Next: " + ("the default mode's longer fine-tunes" if data["mode"] ==
                    "quick" else "fine-tunes of a few epochs for pruned candidates (the study "
                    "config's 390 steps x 128 is one epoch) and a better-trained teacher"))
        out.append(status_row("<= 1 pt below fp32 with >= 8x smaller and as fast",
                              "; ".join(parts) or "no candidate", False, why))
    # 2. every hand recipe dominated or matched by the default (TPE, seed 0) search's front.
    # A default search also enqueues the fp32 and int8-ptq baselines; here they were measured
    # once as recipes (same code path), so they join the front as the product would show it.
    tpe = [s for s in data["searches"] if s["sampler"] == "tpe"]
    if tpe:
        trials_front = tpe[0]["front"]
        baselines = [data["recipes"][b] | {"number": b} for b in ("fp32", "int8-ptq")
                     if data["recipes"].get(b, {}).get("accuracy") is not None]
        missed, missed_names, by_baseline_only = [], [], []
        for name, r in data["recipes"].items():
            if r.get("accuracy") is None:
                continue
            by_trials = [f for f in trials_front if _dominates(f, r)]
            by_base = [b for b in baselines if _dominates(b, r)]
            if by_trials:
                continue
            if by_base:
                by_baseline_only.append(name)
                continue
            missed_names.append(name)
            smaller = [f for f in trials_front + baselines if f["size_bytes"] <= r["size_bytes"]]
            if smaller:
                gap = max(f["accuracy"] for f in smaller) - r["accuracy"]
                missed.append(f"{name} ({100 * gap:+.2f} pt at <= its size)")
            else:
                missed.append(f"{name} (no front point at <= {fmt_bytes(r['size_bytes'])})")
        measured = ("all dominated or matched" if not missed
                    else "not dominated: " + ", ".join(missed))
        if by_baseline_only:
            measured += ("; covered only by the baselines, not by a searched trial: "
                         + ", ".join(by_baseline_only))
        twins = []
        for name in missed_names:
            r = data["recipes"][name]
            same = [t for t in tpe[0]["trials"] if t.get("plan_summary") == r.get("plan_summary")
                    and t.get("accuracy") is not None]
            for t in same:
                twins.append(f"{name}'s plan was the warm start #{t['number']}, which reached "
                             f"{t['accuracy']:.4f} against the recipe's {r['accuracy']:.4f} "
                             f"({100 * (t['accuracy'] - r['accuracy']):+.2f} pt: the same "
                             "fine-tune with another data-order seed, run-to-run noise)")
        why = (f"the TPE front (seed {tpe[0]['seed']}, {tpe[0]['trials_total']} trials) misses "
               + ", ".join(missed) + "; " + ("; ".join(twins) if twins else
               "with few trials, the search's samples rarely land on that corner")
               if missed else "")
        out.append(status_row("every hand recipe dominated/matched by the default (TPE) front",
                              measured, not missed, why))
    # 3. TPE hypervolume >= 1.1x random's (mean over seeds)
    hv = {s: [x["hypervolume"] for x in data["searches"] if x["sampler"] == s] for s in SAMPLERS}
    if hv["random"] and hv["tpe"]:
        r_mean, t_mean = statistics.mean(hv["random"]), statistics.mean(hv["tpe"])
        # Both zero (no front point above chance): no ratio, and no evidence for TPE.
        ratio = t_mean / r_mean if r_mean > 0 else (float("inf") if t_mean > 0 else 0.0)
        trials_n = data["settings"]["trials"]
        startup = data["settings"].get("startup_trials", 8)
        why = (f"TPE/random = {ratio:.3f}, {1.1 - ratio:.3f} short of 1.1"
               + (f"; with {trials_n} trials per search TPE (n_startup_trials={startup}) never "
                  "left its random start-up phase, which draws from the same seeded "
                  "RandomSampler: both searches proposed the same plans"
                  if trials_n <= startup else
                  f"; TPE modelled {trials_n - startup} of {trials_n} trials per search (the "
                  f"first {startup} are the seeded random draws both samplers share), too few "
                  "for its density model over one dimension per layer and group to beat "
                  "uniform sampling reliably; more trials and seeds are the next change"))
        out.append(status_row("TPE hypervolume >= 1.1x random",
                              f"TPE {t_mean:.4f} vs random {r_mean:.4f} (x{ratio:.3f}, "
                              f"{len(hv['tpe'])} seed(s))", ratio >= 1.1, why))
    # 4. framework overhead < 20% (strict: all but fine-tune forward/backward)
    tuned_d = sum(s["overhead"].get("trial_seconds", 0) for s in data["searches"])
    tuned_fb = sum(s["overhead"].get("forward_backward_seconds", 0) for s in data["searches"])
    if tuned_d:
        ov = 1 - tuned_fb / tuned_d
        ph = data["timing"]["phases"]
        costs = {k: v for k, v in ph["mean_s"].items() if k != "finetune"}
        costs["early-stop validation passes (inside finetune)"] = ph["mean_evaluate_s"]
        costs["fake-quant prep + calibration (inside finetune)"] = (
            ph["mean_s"].get("finetune", 0.0) - ph["mean_forward_backward_s"]
            - ph["mean_evaluate_s"]
        )
        top = sorted(costs.items(), key=lambda kv: -kv[1])[:3]
        why = (f"{ov - 0.2:+.1%} over the target; biggest non-training costs per trial: "
               + ", ".join(f"{k} {v:.1f} s" for k, v in top)
               + f", against {ph['mean_forward_backward_s']:.1f} s of forward/backward "
               f"({data['settings']['finetune_steps']}-step fine-tunes). The early-stop rule "
               "scores 1,024 validation images in PyTorch at 1/2 and 3/4 of the steps and "
               "`measure` scores val + test in ONNX Runtime: fixed costs per trial that a longer "
               "fine-tune amortises")
        out.append(status_row("framework overhead < 20%", f"{ov:.1%} (1 - fwd/bwd / trial time "
                              "over fine-tuned search trials)", ov < 0.2, why))
    # 5. over-budget rejection < 3 s: the demo CNN (search_demo.json) and resnet18 here
    if demo_json.is_file():
        import json

        demo = json.loads(demo_json.read_text()).get("rejection") or {}
        rs = demo.get("rejection_seconds", {})
        if rs.get("max") is not None:
            out.append(status_row(
                "over-budget rejection < 3 s (demo CNN, search_demo.json)",
                f"median {rs['median']:.2f} s, max {rs['max']:.2f} s over {demo['rejected']}",
                rs["max"] < 3.0, f"max {rs['max'] - 3.0:+.2f} s over",
            ))
    lat = data.get("latency_scenario") or {}
    if lat.get("rejection_max_s") is not None:
        mx = lat["rejection_max_s"]
        out.append(status_row(
            "over-budget rejection < 3 s (resnet18 224x224)",
            f"median {lat['rejection_median_s']:.1f} s, max {mx:.1f} s over {lat['rejected']}; "
            f"fine-tune spent on none: {not lat['rejected_with_finetune']}",
            mx < 3.0,
            f"{mx - 3.0:+.1f} s over: the pre-check exports the structure at its widths, runs "
            "ORT calibration and times a 224x224 resnet18 (tens of ms per run on this loaded "
            "CPU); the figure scales with the model, the target was set on the demo",
        ))
    # 6. run time
    limit = TARGET_QUICK_S if data["mode"] == "quick" else TARGET_FULL_S
    t = data["timing"]
    bench = t["wall_s"] - t["teacher_train_s"]
    out.append(status_row(f"{data['mode']} run < {limit // 60} min (teacher cached)",
                          f"{bench / 60:.1f} min (+{t['teacher_train_s'] / 60:.1f} min teacher "
                          "training)", bench < limit,
                          f"{(bench - limit) / 60:+.1f} min over at load "
                          f"{data['load']['min']:.1f}-{data['load']['max']:.1f} on 2 cores"))
    return out


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--retrain", action="store_true", help="train the teacher even if cached")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="override the mode's teacher epochs (testing the script)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the Markdown and the plot from the JSON (with --quick: "
                             "the quick files), measure nothing")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    stem = STEMS[mode]
    if args.report_only:
        return _report_only(args.out, stem)
    settings = dict(MODES[mode])
    if args.seeds:
        settings["seeds"] = args.seeds
    if args.trials:
        settings["trials"] = args.trials
    if args.finetune_steps is not None:
        settings["finetune_steps"] = args.finetune_steps
    if args.learning_rate is not None:
        settings["learning_rate"] = args.learning_rate
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="optuna")
    torch_threads = choose_torch_threads(args.torch_threads)
    settings["train_threads"] = torch_threads  # run_search sets torch threads from the config
    loads = LoadSampler()
    loads.mark("start")
    state = machine_state(ort_threads=1, torch_threads=torch_threads)
    log(f"cifar10 benchmark ({mode}): {state_line(state)}")
    started = time.perf_counter()

    from cifar10 import data as cdata

    from autocompress import intake

    how = cdata.ensure_cifar()
    spec = f"imagefolder:{cdata.root()}"
    cache = intake.default_cache_dir()
    t0 = time.perf_counter()
    splits = intake.load_data(spec, seed=0, cache_dir=cache)
    log(f"data: {how}; {splits.describe()['sizes']} loaded in {time.perf_counter() - t0:.0f} s")
    teacher_started = time.perf_counter()
    teacher = get_teacher(splits, mode, cache, args.retrain, args.teacher_epochs)
    teacher_s = time.perf_counter() - teacher_started if teacher["trained_now"] else 0.0
    loads.mark("teacher ready")
    if args.train_only:
        log(f"--train-only: done in {(time.perf_counter() - started) / 60:.1f} min, load "
            f"{loads.summary()}")
        return 0
    del splits

    probe = FinetuneProbe()
    probe.install()
    try:
        task = intake.load_task(MODEL_SPEC, teacher["path"], spec, seed=0, cache_dir=cache)
        config = base_config(settings, teacher["path"], spec, torch_threads)
        log("recipes:")
        STUDIES.mkdir(parents=True, exist_ok=True)
        recipes = run_recipes(task, config, STUDIES / "recipes", probe)
        loads.mark("recipes done")
        fp32_size = recipes["fp32"]["size_bytes"]
        searches = []
        for seed in settings["seeds"]:
            for sampler in SAMPLERS:
                log(f"search: {sampler}, seed {seed}, {settings['trials']} trials")
                cfg = config.replace(sampler=sampler, seed=seed, study=f"cifar10-{sampler}-s{seed}")
                searches.append(run_one_search(cfg, loads, probe, fp32_size))
                loads.mark(f"{sampler} s{seed} done")
                log(f"  hypervolume {searches[-1]['hypervolume']:.4f}, front "
                    f"{len(searches[-1]['front'])}, {searches[-1]['wall_s'] / 60:.1f} min")
        lat = None
        if not args.skip_latency:
            log("latency-bound scenario: resnet18 224x224")
            lat = latency_scenario(settings, loads, probe)
            loads.mark("latency scenario done")
    finally:
        probe.uninstall()

    wall = time.perf_counter() - started
    data: dict[str, Any] = {
        "mode": mode,
        "settings": settings | {"learning_rate": config.learning_rate,
                                "prune_max": config.prune_max,
                                "startup_trials": config.sampler_startup_trials()},
        "machine_start": state,
        "machine_end": machine_state(ort_threads=1, torch_threads=torch_threads),
        "data": {"spec": spec, "how": how, "sizes": task.data.describe()["sizes"],
                 "split_method": task.data.split_method,
                 "split_sha256": task.data.split_sha256()},
        "teacher": teacher | {"fp32_onnx_val_accuracy": recipes["fp32"].get("accuracy"),
                              "fp32_onnx_test_accuracy": recipes["fp32"].get("test_accuracy")},
        "recipes": recipes,
        "hv_reference": {"size_bytes": fp32_size * 1.1, "accuracy": HV_REFERENCE_ACCURACY},
        "searches": searches,
        "latency_scenario": lat,
    }
    data["load"] = loads.summary()
    data["timing"] = {
        "wall_s": wall,
        "teacher_train_s": teacher_s,
        "recipes_s": sum(r["duration_s"] for r in recipes.values()),
        "searches_s": sum(s["wall_s"] for s in searches),
        "latency_scenario_s": lat["wall_s"] if lat else 0.0,
        "phases": phase_summary(searches),
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The measurements go to disk before any reporting code runs: a report that fails must not
    # cost the hour of runs behind it (--report-only rebuilds everything from this file).
    write_json(out / f"{stem}.json", data)
    data["targets"] = targets(data, RESULTS / "search_demo.json")
    _write(data, out, stem)
    log("")
    log(text_table(["target", "measured", "status"], [t[:3] for t in data["targets"]]))
    log(f"\nwall {wall / 60:.1f} min; load 1-min min {data['load']['min']} max "
        f"{data['load']['max']}; torch threads {torch_threads}, ORT threads 1")
    return 0


def _write(data: dict[str, Any], out: Path, stem: str) -> None:
    from cifar10 import report

    report.plot(data, out / f"{stem}_pareto.png")
    write_text(out / f"{stem}.md", report.markdown(data, stem))
    write_json(out / f"{stem}.json", data)
    log(f"wrote {out / stem}.md, {stem}.json, {stem}_pareto.png")


def _report_only(out: Path, stem: str) -> int:
    import json

    data = json.loads((out / f"{stem}.json").read_text())
    data["targets"] = targets(data, RESULTS / "search_demo.json")
    _write(data, out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
