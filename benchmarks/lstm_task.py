"""The LSTM task: a user's LSTM classifier, searched with its LSTM kept float (the space
before issue 34) and with the LSTM in the per-layer space (after).

The task: sklearn digits read as 8 time steps of 8 features, ``nn.LSTM(8, H)`` +
``nn.Linear(H, 10)``, the teacher trained on the task's train part only (a ``--task`` file,
as a user gives one). Each arm is a short search (``--minutes``); reported per arm: the
smallest file within 1 point of the fp32 teacher's test accuracy (ratio to the fp32 file),
and whether a ``--budget`` of ``--budget-kb`` is refused (below the space's smallest
candidate) or searched, with the best feasible trial. "Before" is the same code with the
inventory's quantizable types set back to Conv/Linear/Embedding, measured in the same run.

    nice -n 19 python benchmarks/lstm_task.py --minutes 1.5 --hidden 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    choose_torch_threads,
    fmt_bytes,
    machine_state,
    md_table,
    state_line,
    write_json,
    write_text,
)

TASK = '''
import torch
from sklearn.datasets import load_digits
from torch import nn

HIDDEN = {hidden}


class Rows(nn.Module):
    """A digit's 8 rows as 8 steps of 8 features."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, HIDDEN, batch_first=True)
        self.out = nn.Linear(HIDDEN, 10)

    def forward(self, x):
        steps, _ = self.lstm(x)
        return self.out(steps[:, -1])


def build():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    torch.manual_seed(0)
    net = Rows()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(600):  # the train part only: the test rows stay unseen
        idx = torch.randint(0, 1400, (128,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    parts = [(x[i], int(y[i])) for i in range(len(y))]
    return {{"model": net.eval(), "data": {{"train": parts[:1400], "test": parts[1400:]}}}}
'''

_OLD_TYPES: tuple[str, ...] = ("Conv1d", "Conv2d", "Linear", "Embedding")


def log(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def _space(arm: str) -> Any:
    """"before": the inventory's quantizable types of the space before recurrent layers."""
    from torch import nn

    from autocompress.model import inventory

    saved = inventory.QUANTIZABLE_TYPES
    if arm == "before":
        inventory.QUANTIZABLE_TYPES = tuple(getattr(nn, name) for name in _OLD_TYPES)
    try:
        yield
    finally:
        inventory.QUANTIZABLE_TYPES = saved


def _search(task: str, folder: Path, arm: str, study: str, minutes: float, seed: int,
            budgets: tuple[str, ...], torch_threads: int) -> dict[str, Any]:
    from autocompress.config.options import SearchConfig
    from autocompress.errors import BudgetError
    from autocompress.search.loop import run_search

    config = SearchConfig(task=task, study=study, storage=f"sqlite:///{folder / study}.db",
                          artifacts=str(folder / f"{study}-artifacts"), budgets=budgets,
                          trials=10_000, time_limit=minutes, seed=seed, device="cpu",
                          train_threads=torch_threads)
    started = time.perf_counter()
    with _space(arm):
        try:
            result = run_search(config, on_start=log)
        except BudgetError as exc:
            return {"arm": arm, "budgets": list(budgets), "refused": str(exc),
                    "wall_s": round(time.perf_counter() - started, 1)}
    return _summary(result, arm, budgets, time.perf_counter() - started)


def _summary(result: Any, arm: str, budgets: tuple[str, ...], wall_s: float) -> dict[str, Any]:
    fp32 = result.fp32
    done = [r for r in result.records if r.state == "COMPLETE" and r.size_bytes]
    target = None if fp32 is None or fp32.test_accuracy is None else fp32.test_accuracy - 0.01
    close = [r for r in done if target is not None and r.test_accuracy is not None
             and r.test_accuracy >= target]
    smallest = min(close, key=lambda r: r.size_bytes, default=None)
    feasible = [r for r in done if r.feasible]
    best = max(feasible, key=lambda r: r.accuracy or 0.0, default=None)
    return {
        "arm": arm,
        "budgets": list(budgets),
        "refused": None,
        "wall_s": round(wall_s, 1),
        "trials": len(done),
        "fp32": _row(fp32),
        "smallest_within_1pt": _row(smallest),
        "best_feasible": _row(best) if budgets else None,
        "feasible": len(feasible),
    }


def _row(r: Any) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"number": r.number, "size_bytes": r.size_bytes, "accuracy": r.accuracy,
            "test_accuracy": r.test_accuracy, "latency_vs_fp32": r.latency_vs_fp32,
            "plan": r.plan_summary, "bits": dict(r.plan.get("bits", {})),
            "baseline": r.baseline}


def markdown(data: dict[str, Any]) -> str:
    runs = data["runs"]
    fp32_size = next((r["fp32"]["size_bytes"] for r in runs if r.get("fp32")), None)
    rows = []
    for r in runs:
        if r["refused"]:
            rows.append([r["arm"], ",".join(r["budgets"]) or "-", "refused", "-", "-", "-",
                         r["refused"][:90]])
            continue
        pick = r["best_feasible"] if r["budgets"] else r["smallest_within_1pt"]
        size = pick["size_bytes"] if pick else None
        rows.append([
            r["arm"], ",".join(r["budgets"]) or "-", r["trials"],
            fmt_bytes(size) if size else "none",
            f"{fp32_size / size:.2f}x" if size and fp32_size else "-",
            f"{pick['test_accuracy']:.4f}" if pick and pick["test_accuracy"] is not None
            else "-",
            (f"{pick['plan']} [{pick['baseline']} baseline]" if pick and pick["baseline"]
             else pick["plan"] if pick else "-"),
        ])
    table = md_table(["space", "budget", "trials", "file (smallest within 1 pt / best "
                      "feasible)", "x smaller than fp32", "test acc", "plan"], rows)
    fp32 = next((r["fp32"] for r in runs if r.get("fp32")), None)
    head = (f"fp32 teacher: {fmt_bytes(fp32_size)} file, test accuracy "
            f"{fp32['test_accuracy']:.4f}\n\n" if fp32 else "")
    note = ("The int8-dynamic baseline is ONNX Runtime's whole-file dynamic quantization, "
            "which quantizes the LSTM in both spaces (one scale per direction); the space's "
            "own plans, and the floor a budget is checked against, kept it float before.\n\n")
    return (f"# LSTM task: recurrent layers in the per-layer space\n\n`{data['command']}`\n\n"
            f"{data['machine']}\n\nLSTM hidden {data['hidden']}, {data['minutes']:g} min per "
            f"search, seed {data['seed']}\n\n{head}{table}\n{note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--budget-kb", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--stem", default="lstm_task")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="optuna")
    torch_threads = choose_torch_threads(args.torch_threads)
    state = machine_state(ort_threads=1, torch_threads=torch_threads)
    log(f"lstm task benchmark: {state_line(state)}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="lstm-task-") as tmp:
        folder = Path(tmp)
        (folder / "rows.py").write_text(TASK.format(hidden=args.hidden))
        task = f"{folder / 'rows.py'}:build"
        budget = (f"{args.budget_kb:g}KB",)
        for arm in ("before", "after"):
            for budgets in ((), budget):
                study = f"{arm}-{'budget' if budgets else 'front'}"
                log(f"== {study}: {args.minutes:g} min")
                runs.append(_search(task, folder, arm, study, args.minutes, args.seed,
                                    budgets, torch_threads))
                log(str(runs[-1]))
    data = {"command": "python benchmarks/lstm_task.py " + " ".join(sys.argv[1:]),
            "machine": state_line(state), "hidden": args.hidden, "minutes": args.minutes,
            "seed": args.seed, "runs": runs}
    write_json(RESULTS / f"{args.stem}.json", data)
    text = markdown(data)
    write_text(RESULTS / f"{args.stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
