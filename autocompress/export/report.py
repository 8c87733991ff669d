"""Export's report: report.json, report.md and pareto.png for the chosen candidate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocompress import __version__
from autocompress.config.budgets import Budget
from autocompress.export._results import REPORT_FORMAT_VERSION, Choice
from autocompress.export.program import _Context
from autocompress.export.verify import _runtime_of
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.results import metrics
from autocompress.results.pareto import pareto_front
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def _metrics(record: TrialRecord | None, fp32: TrialRecord | None) -> dict[str, Any]:
    if record is None:
        return {}
    a = record.attrs
    weight_types = record.json_attr("weight_types")
    vs = metrics.record_versus_fp32(record, fp32)
    return {
        "trial": record.number,
        "baseline": record.baseline,
        "plan_summary": record.plan_summary,
        "size_bytes": record.size_bytes,
        "zip_size_bytes": a.get(trial_attrs.ZIP_SIZE),
        "times_smaller": vs["times_smaller"],
        "latency_ms": record.latency_ms,
        "latency_spread_ms": record.latency_spread_ms,
        "latency_p10_ms": a.get(trial_attrs.LATENCY_P10),
        "latency_p90_ms": a.get(trial_attrs.LATENCY_P90),
        "latency_vs_fp32": record.latency_vs_fp32,
        "times_faster": vs["times_faster"],
        "fp32_latency_ms": a.get(trial_attrs.FP32_LATENCY),
        "runtime": _runtime_of(record),
        "accuracy_val": record.accuracy,
        "accuracy_test": record.test_accuracy,
        "accuracy_drop_rate_val": vs["accuracy_drop_rate"],
        "accuracy_drop_rate_test": (
            metrics.accuracy_drop_rate(fp32.test_accuracy, record.test_accuracy) if fp32 else None
        ),
        "flops": record.flops,
        "flop_reduction_rate": vs["flop_reduction_rate"],
        "bops": record.bops,
        "bops_reduction_rate": vs["bops_reduction_rate"],
        "params": record.params,
        "param_reduction_rate": (
            metrics.reduction_rate(fp32.params, record.params) if fp32 else None
        ),
        "weight_types": dict(Counter(weight_types.values())) if weight_types else None,
    }


def layer_table(
    before: Inventory | None,
    after: Inventory,
    plan: CompressionPlan,
    weight_types: dict[str, str] | None,
) -> list[dict[str, Any]]:
    """Per Conv/Linear layer: planned bits, weight type in the file, its group's prune
    ratio, params and FLOPs before (the study's inventory) and after (the rebuilt model)."""
    after_by_name = {info.name: info for info in after.layers}
    source = before if before is not None else after
    group_of = {m: g.name for g in source.groups for m in g.members}
    rows = []
    for info in source.layers:
        if info.type not in ("Conv1d", "Conv2d", "Conv3d", "Linear"):
            continue
        new = after_by_name.get(info.name)
        group = group_of.get(info.name)
        rows.append({
            "layer": info.name,
            "type": info.type,
            "bits": plan.bits_for(info.name),
            "weights_in_file": (weight_types or {}).get(info.name),
            "prune_group": group,
            "prune_ratio": plan.ratio_for(group) if group else 0.0,
            "params_before": info.params if before is not None else None,
            "params_after": new.params if new else None,
            "flops_before": info.flops if before is not None else None,
            "flops_after": new.flops if new else None,
            "excluded_reason": info.excluded_reason,
        })
    return rows


def _runner_up(record: TrialRecord, chosen: TrialRecord) -> dict[str, Any]:
    if (record.accuracy or 0.0) < (chosen.accuracy or 0.0):
        why = "lower validation accuracy"
    else:
        why = "same validation accuracy, larger file"
    return {
        "trial": record.number,
        "accuracy_val": record.accuracy,
        "size_bytes": record.size_bytes,
        "latency_ms": record.latency_ms,
        "plan_summary": record.plan_summary,
        "why_not_chosen": why,
    }


def _report(
    ctx: _Context,
    choice: Choice,
    record: TrialRecord,
    fp32: TrialRecord | None,
    plan: CompressionPlan,
    after: Inventory,
    verification: dict[str, Any] | None,
    program_diff: float,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fp32_row = _metrics(fp32, fp32)
    if not fp32_row:
        fp32_row = {
            "trial": None,
            "baseline": "fp32 (no baseline trial; teacher figures from the study)",
            "accuracy_val": ctx.info.attrs.get("fp32_accuracy"),
            "flops": ctx.inventory.total_flops if ctx.inventory else None,
            "params": ctx.inventory.total_params if ctx.inventory else None,
        }
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "created_by": f"autocompress {__version__}",
        "study": ctx.info.name,
        "storage": ctx.info.storage_url,
        "model_spec": ctx.model_spec,
        "data_spec": ctx.info.attrs.get("data_spec"),
        "trial": record.number,
        "inputs": inputs,
        "selection": {
            "rule": choice.rule,
            "budgets": [b.to_dict() for b in choice.budgets],
            "max_accuracy_drop": choice.max_accuracy_drop,
            "reference_accuracy": choice.reference_accuracy,
            "runners_up": [_runner_up(r, record) for r in choice.runners_up],
        },
        "candidate": _metrics(record, fp32),
        "fp32": fp32_row,
        "definitions": {
            "accuracy_drop_rate": "(original - compressed) / original, fp32 baseline trial",
            "flop_reduction_rate": "(original - compressed) / original, fvcore counts",
            "bops": "sum over Conv/Linear layers of MACs x weight bits x activation bits",
            "latency": "median and IQR (spread) of ONNX Runtime runs, interleaved with fp32",
            "times_smaller": "fp32 file bytes / exported file bytes",
        },
        "torch_kind": record.attrs.get(trial_attrs.TORCH_KIND),
        "notes": _notes(record, choice),
        "program_max_abs_diff": program_diff,
        "layers": layer_table(ctx.inventory, after, plan, record.json_attr("weight_types")),
        "plan": plan.to_dict(),
        "verification": verification,
    }


def _notes(record: TrialRecord, choice: Choice) -> list[str]:
    notes = []
    if not record.feasible:
        constraints = record.json_attr("constraints") or {}
        broken = ", ".join(f"{k} (+{v:.0%})" for k, v in constraints.items() if v > 0)
        notes.append(f"trial {record.number} is over the study's budgets"
                     + (f": {broken}" if broken else ""))
    if record.quantized_by_runtime:
        what = record.baseline or f"PTQ ({record.plan.get('calibration')} calibration)"
        notes.append(f"{what} quantizes the ONNX file only: model.pt2 is the float model "
                     "it was quantized from, so the two can disagree on a few samples")
    elif record.baseline == "fp32":
        notes.append("this is the uncompressed fp32 baseline")
    if choice.max_accuracy_drop is not None:
        notes.append("the accuracy-drop limit filters candidates; among those left the most "
                     "accurate is chosen")
    return notes


def _plot(
    path: Path,
    records: list[TrialRecord],
    chosen: TrialRecord,
    ctx: _Context,
    budgets: Sequence[Budget],
) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [r for r in records if r.measured]
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (
        ("size", "size_bytes", 1e-3, "file size (KB)"),
        ("latency", "latency_ms", 1.0, "latency (ms, median, ONNX Runtime)"),
    )
    for ax, (objective, attr, scale, label) in zip(axes, panels, strict=True):
        def x_of(r: TrialRecord, attr: str = attr, scale: float = scale) -> float:
            return float(getattr(r, attr) or 0.0) * scale

        ok = [r for r in measured if r.feasible]
        over = [r for r in measured if not r.feasible]
        ax.scatter([x_of(r) for r in ok], [r.accuracy for r in ok], c="tab:blue", s=22,
                   label="within the study's budgets", alpha=0.7)
        if over:
            ax.scatter([x_of(r) for r in over], [r.accuracy for r in over], c="tab:gray",
                       marker="x", s=22, label="over budget")
        front = sorted(pareto_front(records, ("accuracy", objective)), key=x_of)
        if front:
            ax.step([x_of(r) for r in front], [r.accuracy for r in front], where="post",
                    c="tab:blue", lw=1, label="Pareto front")
        for r in measured:
            if r.baseline:
                ax.annotate(r.baseline, (x_of(r), r.accuracy), fontsize=7,
                            xytext=(4, -10), textcoords="offset points")
        xs = [x_of(r) for r in measured] or [0.0]
        for b in budgets:
            if b.kind != objective:
                continue
            # A budget far beyond every trial would squash the points into one column.
            if b.value * scale <= 1.5 * max(xs):
                ax.axvline(b.value * scale, c="tab:red", ls="--", lw=1,
                           label=f"budget {b.text}")
            else:
                ax.set_title(f"budget {b.text} is beyond every trial", fontsize=8)
        if getattr(chosen, attr) is not None:
            ax.scatter([x_of(chosen)], [chosen.accuracy], marker="*", s=260, c="tab:red",
                       edgecolors="black", zorder=5, label=f"exported: trial {chosen.number}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"study {ctx.info.name!r}: {len(measured)} measured trials")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
