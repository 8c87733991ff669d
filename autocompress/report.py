"""Terminal output: the live progress bar (stderr) and the Pareto tables (stdout)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from autocompress.config import Budget, format_bytes
from autocompress.pareto import TrialRecord

_out = Console(soft_wrap=True)  # resolves sys.stdout at write time (pytest swaps it)
_PIPE_WIDTH = 150  # tables piped to a file or `less` would otherwise wrap at 80 columns


def _table_console() -> Console:
    if not _out.is_terminal:
        _out.width = _PIPE_WIDTH
    return _out
_err = Console(stderr=True)


class SearchProgress:
    """trial i/N, feasible so far, best accuracy within budget, ETA."""

    def __init__(self, trials: int, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]trial {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=_err,
            transient=True,  # a one-line error stays one line; the table follows success
            disable=not enabled,
        )
        self._task = self._progress.add_task("search", total=trials, status="starting")

    def __enter__(self) -> SearchProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def note(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text)

    def update(self, progress: Any) -> None:
        best = "-" if progress.best_accuracy is None else f"{progress.best_accuracy:.4f}"
        last = progress.last
        outcome = last.state.lower()
        if last.rejected:
            outcome = "rejected"
        elif last.baseline:
            outcome = f"baseline {last.baseline}"
        status = f"feasible {progress.feasible} | best acc in budget {best} | last: {outcome}"
        self._progress.update(
            self._task, total=progress.total, completed=progress.done, status=status
        )


def _fp32(records: Sequence[TrialRecord]) -> TrialRecord | None:
    return next((r for r in records if r.baseline == "fp32" and r.measured), None)


def record_json(record: TrialRecord, fp32: TrialRecord | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trial": record.number,
        "state": record.state,
        "baseline": record.baseline,
        "warm_start": record.attrs.get("warm_start"),
        "feasible": record.feasible,
        "accuracy": record.accuracy,
        "test_accuracy": record.test_accuracy,
        "size_bytes": record.size_bytes,
        "latency_ms": record.latency_ms,
        "latency_spread_ms": record.latency_spread_ms,
        "latency_vs_fp32": record.latency_vs_fp32,
        "latency_estimate_ms": record.latency_estimate_ms,
        "flops": record.flops,
        "params": record.params,
        "plan_summary": record.plan_summary,
        "rejected": record.rejected,
        "fail_reason": record.fail_reason,
    }
    if fp32 and fp32.size_bytes and record.size_bytes:
        data["times_smaller"] = fp32.size_bytes / record.size_bytes
        if record.accuracy is not None and fp32.accuracy is not None:
            data["accuracy_change_points"] = 100 * (record.accuracy - fp32.accuracy)
    if record.latency_vs_fp32:
        data["times_faster"] = 1.0 / record.latency_vs_fp32
    return data


def result_json(result: Any) -> dict[str, Any]:
    fp32 = _fp32(result.records)
    return {
        "study": result.study,
        "storage": result.storage_url,
        "artifacts": result.artifacts_dir,
        "budgets": [b.to_dict() for b in result.budgets],
        "new_trials": result.new_trials,
        "rejected_this_run": result.rejected,
        "stop_reason": result.stop_reason,
        "trials": len(result.records),
        "front": [record_json(r, fp32) for r in result.front],
    }


def print_front(
    records: Sequence[TrialRecord],
    shown: Sequence[TrialRecord],
    budgets: Sequence[Budget],
    *,
    title: str,
) -> None:
    fp32 = _fp32(records)
    table = Table(title=title, title_justify="left")
    for header in ("trial", "accuracy", "Δ vs fp32", "size", "× smaller", "latency ms",
                   "× faster", "MFLOPs", "plan"):
        table.add_column(header, justify="left" if header == "plan" else "right")
    for r in shown:
        if r.accuracy is None or r.size_bytes is None:
            table.add_row(str(r.number), "-", "-", "-", "-", "-", "-", "-",
                          escape(r.fail_reason or r.rejected or r.attrs.get("early_stopped")
                                 or r.state.lower()))
            continue
        delta = "" if fp32 is None or fp32.accuracy is None else (
            f"{100 * (r.accuracy - fp32.accuracy):+.2f} pt")
        smaller = f"{fp32.size_bytes / r.size_bytes:.1f}" if fp32 and fp32.size_bytes else ""
        faster = f"{1 / r.latency_vs_fp32:.2f}" if r.latency_vs_fp32 else ""
        latency = "" if r.latency_ms is None else (
            f"{r.latency_ms:.3f} ±{(r.latency_spread_ms or 0) / 2:.3f}")
        label = r.plan_summary
        if r.baseline:
            label = f"[baseline {r.baseline}] {label}"
        elif r.attrs.get("warm_start"):
            label = f"[warm start {r.attrs['warm_start']}] {label}"
        if r.rejected:
            label = f"[rejected] {r.rejected}"
        if not r.feasible:
            label = f"[over budget] {label}"
        table.add_row(str(r.number), f"{r.accuracy:.4f}", delta, format_bytes(r.size_bytes),
                      smaller, latency, faster,
                      "" if r.flops is None else f"{r.flops / 1e6:.2f}", escape(label))
    _table_console().print(table)
    counts = _counts(records)
    budget_text = ", ".join(b.text for b in budgets) or "none"
    _out.print(f"budgets: {budget_text} | trials: {counts} | latency: median ±IQR/2, "
               "ONNX Runtime CPU, interleaved with fp32")


def _counts(records: Sequence[TrialRecord]) -> str:
    complete = sum(r.state == "COMPLETE" for r in records)
    feasible = sum(r.measured and r.feasible for r in records)
    rejected = sum(r.rejected is not None for r in records)
    failed = sum(r.state == "FAIL" for r in records)
    pruned = sum(r.state == "PRUNED" and r.rejected is None for r in records)
    return (f"{len(records)} ({complete} complete, {feasible} feasible, {rejected} rejected "
            f"over budget, {pruned} stopped early, {failed} failed)")


def print_next_steps(study: str, storage_url: str, artifacts_dir: str) -> None:
    default = storage_url == f"sqlite:///studies/{study}.db"
    where = f"--study {study}" + ("" if default else f" --storage {storage_url}")
    _out.print(
        "next:\n"
        f"  autocompress dashboard {where}      # browse the front\n"
        f"  autocompress export --best {where} --out out/   # deployable file + report"
    )


def print_studies(rows: Sequence[dict[str, Any]]) -> None:
    table = Table(title="Studies", title_justify="left")
    for header in ("study", "model", "data", "trials", "complete", "failed", "running",
                   "storage"):
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(row.get(h, "")) for h in ("study", "model", "data", "trials",
                                                      "complete", "failed", "running",
                                                      "storage")))
    if not rows:
        _out.print("no studies found (run `autocompress search` first)")
        return
    _table_console().print(table)
