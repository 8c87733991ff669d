"""Terminal output: the live progress bar (stderr) and the Pareto tables (stdout)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from autocompress.config.budgets import Budget, format_bytes
from autocompress.config.options import default_storage_url
from autocompress.intake.metric import TOP1_NAME
from autocompress.results import metrics
from autocompress.results.pareto import fp32_record
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord

_out = Console(soft_wrap=True)  # resolves sys.stdout at write time (pytest swaps it)
_PIPE_WIDTH = 150  # tables piped to a file or `less` would otherwise wrap at 80 columns


def _table_console() -> Console:
    if not _out.is_terminal:
        _out.width = _PIPE_WIDTH
    return _out
_err = Console(stderr=True)


class _Bar:
    """A rich progress bar on stderr used as a context manager, with notes printed above it."""

    enabled: bool
    _progress: Progress

    def __enter__(self) -> Self:
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


class SearchProgress(_Bar):
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
            disable=not (enabled and _err.is_terminal),
        )
        self._task = self._progress.add_task("search", total=trials, status="starting")


    def update(self, progress: Any) -> None:
        best = "-" if progress.best_accuracy is None else f"{progress.best_accuracy:.4f}"
        last = progress.last
        outcome = last.state.lower()
        if last.rejected:
            outcome = "rejected"
        elif last.baseline:
            outcome = f"baseline {last.baseline}"
        elif last.attrs.get(trial_attrs.PARENT) is not None:
            outcome = f"retrain of #{last.attrs['parent_trial']} {outcome}"
        status = f"feasible {progress.feasible} | best acc in budget {best} | last: {outcome}"
        if self.enabled and not _err.is_terminal:
            # A batch job's log: one line per finished trial instead of a redrawn bar.
            acc = "-" if last.accuracy is None else f"{last.accuracy:.4f}"
            _err.print(f"trial {progress.done}/{progress.total} (#{last.number} {outcome}, "
                       f"acc {acc}, {last.plan_summary or '-'}) | feasible {progress.feasible}"
                       f" | best acc in budget {best} | {progress.elapsed_s / 60:.1f} min",
                       highlight=False, soft_wrap=True)
            return
        self._progress.update(
            self._task, total=progress.total, completed=progress.done, status=status
        )


def record_json(record: TrialRecord, fp32: TrialRecord | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trial": record.number,
        "state": record.state,
        "baseline": record.baseline,
        "warm_start": record.attrs.get(trial_attrs.WARM_START),
        "feasible": record.feasible,
        "accuracy": record.accuracy,
        "test_accuracy": record.test_accuracy,
        "size_bytes": record.size_bytes,
        "zip_size_bytes": record.attrs.get(trial_attrs.ZIP_SIZE),
        "latency_ms": record.latency_ms,
        "latency_spread_ms": record.latency_spread_ms,
        "latency_vs_fp32": record.latency_vs_fp32,
        "latency_estimate_ms": record.latency_estimate_ms,
        "flops": record.flops,
        "bops": record.bops,
        "params": record.params,
        "plan_summary": record.plan_summary,
        "rejected": record.rejected,
        "fail_reason": record.fail_reason,
    }
    if record.accuracy is not None:
        data.update(metrics.record_versus_fp32(record, fp32))
    return data


def result_json(result: Any) -> dict[str, Any]:
    fp32 = fp32_record(result.records)
    return {
        "study": result.study,
        "storage": result.storage_url,
        "artifacts": result.artifacts_dir,
        "budgets": [b.to_dict() for b in result.budgets],
        "new_trials": result.new_trials,
        "rejected_this_run": result.rejected,
        "stop_reason": result.stop_reason,
        "metric": result.metric,
        "trials": len(result.records),
        "front": [record_json(r, fp32) for r in result.front],
    }


def print_front(
    records: Sequence[TrialRecord],
    shown: Sequence[TrialRecord],
    budgets: Sequence[Budget],
    *,
    title: str,
    metric: str = TOP1_NAME,
) -> None:
    """The front as a table; ``metric`` labels the accuracy objective (a task's own metric:
    its change is shown as a plain difference, not in accuracy points)."""
    fp32 = fp32_record(records)
    table = Table(title=title, title_justify="left")
    points = metric == TOP1_NAME
    for header in ("trial", metric, "Δ vs fp32", f"{'acc' if points else metric} drop", "size",
                   "× smaller", "latency ms", "× faster", "MFLOPs", "FLOPs −", "BOPs −", "plan"):
        table.add_column(header, justify="left" if header == "plan" else "right")
    for r in shown:
        if r.accuracy is None or r.size_bytes is None:
            table.add_row(str(r.number), *["-"] * 10,
                          escape(r.fail_reason or r.rejected
                                 or r.attrs.get(trial_attrs.EARLY_STOPPED) or r.state.lower()))
            continue
        vs = metrics.record_versus_fp32(r, fp32)
        latency = "" if r.latency_ms is None else (
            f"{r.latency_ms:.3f} ±{(r.latency_spread_ms or 0) / 2:.3f}")
        label = r.plan_summary
        if r.baseline:
            label = f"[baseline {r.baseline}] {label}"
        elif r.attrs.get(trial_attrs.WARM_START):
            label = f"[warm start {r.attrs['warm_start']}] {label}"
        elif r.attrs.get(trial_attrs.GUIDED):
            label = f"[{r.attrs['guided']}] {label}"
        if not r.baseline and r.attrs.get(trial_attrs.FIDELITY) == "calibration":
            label = f"[calibration only] {label}"  # no fine-tune: pruned, BN, PTQ
        if r.attrs.get(trial_attrs.PARENT) is not None:
            what = ("refined" if r.attrs.get(trial_attrs.REFINE_EPOCHS) else "promoted")
            label = (f"[{what} #{r.attrs['parent_trial']}, "
                     f"{r.plan.get('finetune_steps')} steps] {label}")
        if r.rejected:
            label = f"[rejected] {r.rejected}"
        if not r.feasible:
            label = f"[over budget] {label}"
        table.add_row(str(r.number), f"{r.accuracy:.4f}",
                      _shown(vs["accuracy_change_points"], "{:+.2f} pt") if points else
                      _shown(None if fp32 is None or fp32.accuracy is None
                             else r.accuracy - fp32.accuracy, "{:+.4f}"),
                      _shown(vs["accuracy_drop_rate"], "{:.2%}"), format_bytes(r.size_bytes),
                      _shown(vs["times_smaller"], "{:.1f}"), latency,
                      _shown(vs["times_faster"], "{:.2f}"),
                      _shown(None if r.flops is None else r.flops / 1e6, "{:.2f}"),
                      _shown(vs["flop_reduction_rate"], "{:.0%}"),
                      _shown(vs["bops_reduction_rate"], "{:.0%}"), escape(label))
    _table_console().print(table)
    counts = _counts(records)
    budget_text = ", ".join(b.shown() for b in budgets) or "none"
    _out.print(f"budgets: {budget_text} | trials: {counts} | latency: median ±IQR/2, "
               "ONNX Runtime CPU, interleaved with fp32 | acc drop, FLOPs −, BOPs −: "
               "(fp32 - trial) / fp32")


def _shown(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


def _counts(records: Sequence[TrialRecord]) -> str:
    complete = sum(r.state == "COMPLETE" for r in records)
    feasible = sum(r.measured and r.feasible for r in records)
    rejected = sum(r.rejected is not None for r in records)
    failed = sum(r.state == "FAIL" for r in records)
    pruned = sum(r.state == "PRUNED" and r.rejected is None for r in records)
    return (f"{len(records)} ({complete} complete, {feasible} feasible, {rejected} rejected "
            f"over budget, {pruned} stopped early, {failed} failed)")


def print_next_steps(study: str, storage_url: str, artifacts_dir: str) -> None:
    default = storage_url == default_storage_url(study)
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


class StepProgress(_Bar):
    """Fine-tune step i/N with a bar and an ETA (``autocompress refine``); on a terminal only,
    elsewhere a line every tenth of the run."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._live = enabled and _err.is_terminal
        self._label = label
        self._last_tenth = -1
        self._progress = Progress(
            TextColumn(f"[bold]{escape(label)}" + " step {task.completed}/{task.total}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=_err,
            transient=True,
            disable=not self._live,
        )
        self._task = self._progress.add_task(label, total=None)


    def update(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self._live:
            self._progress.update(self._task, total=total, completed=step)
            return
        tenth = (10 * step) // max(total, 1)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            _err.print(f"{self._label}: step {step}/{total}")


def print_sensitivity(table: Any, *, top: int | None = None) -> None:
    """The sensitivity table: one row per layer (KL to the teacher and accuracy at each
    width), one per group (at each ratio), most sensitive first."""
    widths = sorted({int(b) for e in table.layers.values() for b in e["bits"]}, reverse=True)
    layers = Table(title=f"Layer sensitivity (KL to the teacher on {table.images} validation "
                   f"images, nothing fine-tuned; teacher accuracy "
                   f"{table.teacher_accuracy:.4f})", title_justify="left")
    layers.add_column("layer")
    layers.add_column("params", justify="right")
    for b in widths:
        layers.add_column(f"int{b} KL", justify="right")
        layers.add_column(f"int{b} acc", justify="right")
    low = min(widths) if widths else None
    rows = sorted(table.layers.items(),
                  key=lambda kv: -float(kv[1]["bits"].get(str(low), {}).get("kl", 0.0)))
    for name, entry in rows[:top]:
        cells = [escape(name), f"{entry['params']:,}"]
        for b in widths:
            got = entry["bits"].get(str(b))
            # "~": not measured before the pass's time share ran out; the median layer's figure
            mark = "~" if got is not None and got.get("estimated") else ""
            cells += (["-", "-"] if got is None
                      else [f"{mark}{got['kl']:.4g}", f"{mark}{got['accuracy']:.4f}"])
        layers.add_row(*cells)
    _table_console().print(layers)
    if table.groups:
        ratios = sorted({float(r) for g in table.groups.values() for r in g["ratios"]})
        groups = Table(title="Prunable group sensitivity (channels removed, BatchNorm "
                       "re-estimated, nothing fine-tuned)", title_justify="left")
        groups.add_column("group")
        for r in ratios:
            groups.add_column(f"{r:.0%} KL", justify="right")
            groups.add_column(f"{r:.0%} acc", justify="right")
        last = f"{ratios[-1]:g}"
        rows = sorted(table.groups.items(),
                      key=lambda kv: -float(kv[1]["ratios"].get(last, {}).get("kl", 0.0)))
        for name, entry in rows[:top]:
            cells = [escape(name)]
            mark = "~" if entry.get("estimated") else ""
            for r in ratios:
                got = entry["ratios"].get(f"{r:g}")
                cells += (["-", "-"] if got is None
                          else [f"{mark}{got['kl']:.4g}", f"{mark}{got['accuracy']:.4f}"])
            groups.add_row(*cells)
        _table_console().print(groups)
    if low is not None:
        fragile = table.fragile_layers(low)
        _out.print("keep at higher precision (int" + f"{low} damage > 5x the median layer's): "
                   + (", ".join(fragile) if fragile else "none"))
    if table.estimated or table.unscored:
        _out.print(f"~ estimated, not measured ({len(table.estimated)} layers, "
                   f"{len(table.unscored)} groups: the pass's time ran out): the median "
                   "measured layer's or group's figures")
    if table.failed:
        _out.print(f"not scored ({len(table.failed)}): " + "; ".join(
            f"{choice}: {why}" for choice, why in list(table.failed.items())[:5]))
    _out.print(f"measured in {table.seconds:.1f} s")
