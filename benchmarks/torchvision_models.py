"""Ten torchvision models no test names, each through a 2-trial search at 64x64 (issue 18).

    python benchmarks/torchvision_models.py                  # all ten, ~1 h on 2 cores
    python benchmarks/torchvision_models.py --models googlenet swin_t

Each model runs as its own ``autocompress search`` process (default settings: learning-rate
probe, baselines, warm starts, ``--trials 2``, 20 fine-tune steps; ``--no-guided`` unless
``--guided``: see NO_GUIDED) on a real-image subset of CIFAR-10 (50 train and 20 test images
per class, resized to 64x64; inception_v3 needs 75x75 at least and runs at 80x80), random
weights (the figures are memory, time and whether the pipeline holds, not accuracy).
``/usr/bin/time -v`` gives the process's peak resident memory; the table also gives the exit
code, the trials completed and failed, and any warning about layers that lost pruning (the
dependency analysis guard). Target: none killed, none over 8 GB. Writes
benchmarks/results/torchvision_models.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS, machine_state, md_table, state_line, write_json, write_text

MODELS = ("regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121", "mnasnet0_5",
          "googlenet", "convnext_tiny", "swin_t", "vit_b_16", "inception_v3")
MIN_SIZE = {"inception_v3": 80}  # its stem reduces 64x64 below its 3x3 kernels
SIZE = 64
LIMIT_GB = 8.0
# The sensitivity pass builds a pruned copy of the model for every prunable group x prune
# ratio: on densenet121 (~60 groups x 14 ratios) that was still running after 20 minutes on
# 2 cores. These runs measure memory and robustness, so they skip it (--no-guided) unless
# --guided is given; its cost on large models is a figure of its own.
NO_GUIDED = ("--no-guided",)
CACHE = REPO / "benchmarks" / "cache" / "torchvision_models"


def cifar_subset(source: Path, dest: Path, train: int = 50, test: int = 20) -> Path:
    """An ImageFolder of real CIFAR-10 images (symlinks): ``train``/``test`` per class."""
    for split, count in (("train", train), ("test", test)):
        for cls in sorted(p.name for p in (source / split).iterdir() if p.is_dir()):
            out = dest / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted((source / split / cls).iterdir())[:count]:
                link = out / image.name
                if not link.exists():
                    link.symlink_to(image)
    return dest


def run_model(name: str, data: Path, minutes: float, guided: bool) -> dict[str, Any]:
    size = MIN_SIZE.get(name, SIZE)
    folder = CACHE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "autocompress", "search",
           "--model", f"torchvision:{name}", "--data", f"imagefolder:{data}",
           "--input-size", str(size), "--trials", "2", "--finetune-steps", "20",
           "--batch-size", "16", "--latency-repeats", "10",
           *(() if guided else NO_GUIDED), "--study", name,
           "--storage", f"sqlite:///{folder / 'study.db'}", "--artifacts",
           str(folder / "artifacts"), "--json"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=minutes * 60,
                              cwd=folder, env={**os.environ, "AUTOCOMPRESS_CACHE": str(folder)})
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    signal = re.search(r"Command terminated by signal (\d+)", err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("\t")]
    warnings = [ln.strip() for ln in lines if "pruning" in ln.lower() and "warning" in ln.lower()]
    states = _trial_states(folder / "study.db", name)
    return {
        "model": name, "input": size, "guided": guided, "exit_code": code,
        "killed_by_signal": int(signal.group(1)) if signal else None,
        "peak_rss_gb": int(rss.group(1)) / 1024**2 if rss else None,
        "wall_s": wall, "trials": states, "pruning_warnings": warnings[:3],
        "last_error": next((ln for ln in reversed(lines) if ln.startswith("error:")), None),
        "stdout_tail": out[-400:],
    }


def _trial_states(db: Path, study: str) -> dict[str, int]:
    if not db.exists():
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = optuna.load_study(study_name=study, storage=f"sqlite:///{db}").trials
    except Exception:  # a study that was never created: no trials to count
        return {}
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--minutes", type=float, default=20.0, help="per model, then killed")
    parser.add_argument("--guided", action="store_true",
                        help="keep the sensitivity pass and guided plans (slow on big models)")
    parser.add_argument("--cifar", default=os.environ.get("AUTOCOMPRESS_BENCH_CIFAR_ROOT",
                                                          "~/.cache/cifar10"))
    args = parser.parse_args(argv)
    data = cifar_subset(Path(args.cifar).expanduser(), CACHE / "cifar10-subset")
    state = machine_state(ort_threads=1, torch_threads=os.cpu_count() or 1)
    # rows of models not rerun now are kept from the last run (one table for all ten)
    previous = RESULTS / "torchvision_models.json"
    kept = ([r for r in json.loads(previous.read_text())["rows"] if r["model"] not in args.models]
            if previous.exists() else [])
    rows: list[dict[str, Any]] = list(kept)
    for name in args.models:
        row = run_model(name, data, args.minutes, args.guided)
        rows.append(row)
        print(f"{name}: exit {row['exit_code']}, {row['peak_rss_gb'] or 0:.2f} GB, "
              f"{row['wall_s']:.0f} s, trials {row['trials']}"
              + (f", {row['last_error']}" if row["last_error"] else ""), flush=True)
        write_json(RESULTS / "torchvision_models.json", {"machine": state, "rows": rows})
    table = md_table(
        ["model", "input", "exit", "peak RSS", "wall", "trials", "note"],
        [[r["model"] + (" (guided)" if r.get("guided", True) else ""),
          f"{r['input']}x{r['input']}",
          r["exit_code"] if r["exit_code"] is not None else "timeout",
          f"{r['peak_rss_gb']:.2f} GB" if r["peak_rss_gb"] is not None else "?",
          f"{r['wall_s']:.0f} s",
          ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["trials"].items())) or "none",
          r["last_error"] or "; ".join(r["pruning_warnings"]) or ""] for r in rows])
    killed = [r["model"] for r in rows if r["killed_by_signal"] or r["exit_code"] is None]
    over = [r["model"] for r in rows if (r["peak_rss_gb"] or 0) > LIMIT_GB]
    verdict = (f"Killed or timed out: {', '.join(killed) or 'none'}. Over {LIMIT_GB:.0f} GB: "
               f"{', '.join(over) or 'none'}.")
    text = (f"# Ten torchvision models, 2-trial searches\n\n{state_line(state)}\n\n"
            "`python benchmarks/torchvision_models.py` — each model its own `autocompress "
            "search` process (default settings, `--trials 2 --finetune-steps 20`; "
            "`--no-guided` unless the row says guided), real "
            "CIFAR-10 images (50 train / 20 test per class), random weights; peak RSS from "
            f"`/usr/bin/time -v`.\n\n{table}\n\n{verdict}\n")
    write_text(RESULTS / "torchvision_models.md", text)
    print(text)
    return 1 if killed or over else 0


if __name__ == "__main__":
    sys.exit(main())
