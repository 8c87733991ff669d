"""report.md: the export report (``report.json``'s figures) as a page a person reads."""

from __future__ import annotations

import json
from typing import Any

from autocompress.config.budgets import format_bytes
from autocompress.export._results import _speed_text
from autocompress.runtime import executorch as executorch_runtime


def markdown(report: dict[str, Any]) -> str:
    """The whole page: choice, figures against fp32, runtime, layers, verification, files."""
    lines = _heading(report)
    lines += _figures(report)
    lines += _runtime(report["candidate"].get("runtime") or {})
    lines += _layers(report["layers"])
    lines += _verification(report.get("verification"))
    lines += ["", "## Files", "", *_deployed_files(report)]
    lines += [
        "- `model.pt2`: `torch.export.load('model.pt2').module()(x)`; needs only PyTorch.",
        "- `plan.json`: `autocompress.rebuild(model_spec, weights, plan, state_dict=...)`.",
        "- `report.json`: every figure above as data; `pareto.png`: the study's trials.",
        "",
    ]
    return "\n".join(lines)


def _measured_file(report: dict[str, Any]) -> str:
    """The written file the figures are of: model.pte for the executorch-xnnpack target."""
    target = (report["candidate"].get("runtime") or {}).get("target")
    return "model.pte" if target == executorch_runtime.TARGET else "model.onnx"


def _deployed_files(report: dict[str, Any]) -> list[str]:
    if _measured_file(report) == "model.pte":
        return [
            "- `model.pte`: the measured ExecuTorch program (XNNPACK backend, int8/int4 weights "
            "where XNNPACK holds them); load it with ExecuTorch's runtime "
            "(`executorch.runtime.Runtime.get().load_program('model.pte')`); its input shape "
            "is fixed at the latency batch.",
            "- `model.onnx`: the same compressed model as ONNX (QDQ weights per plan), for "
            "ONNX tools; the figures above are not its.",
        ]
    return ["- `model.onnx`: deploy with ONNX Runtime (QDQ int8/int4 weights per plan)."]


def _heading(report: dict[str, Any]) -> list[str]:
    """Title, what was compressed, the rule that chose it, notes and the runners-up."""
    cand, sel = report["candidate"], report["selection"]
    lines = [
        f"# autocompress export: trial {report['trial']} of study `{report['study']}`",
        "",
        f"Model `{report['model_spec']}` on data `{report['data_spec']}`; plan "
        f"`{cand.get('plan_summary') or '-'}`.",
        "",
        f"**Chosen by:** {sel['rule']}.",
        "",
    ]
    inputs = report.get("inputs") or {}
    if inputs.get("packed"):
        lines += [f"**Input:** {inputs['packed']}.", ""]
    lines += [f"**Note:** {note}." for note in report.get("notes", [])]
    if report.get("notes"):
        lines.append("")
    if sel["runners_up"]:
        lines += ["| runner-up | val accuracy | size | latency ms | why not chosen |",
                  "|---|---|---|---|---|"]
        for r in sel["runners_up"]:
            lines.append(
                f"| trial {r['trial']} | {_fmt(r['accuracy_val'])} | "
                f"{format_bytes(r['size_bytes']) if r['size_bytes'] else '-'} | "
                f"{_fmt(r['latency_ms'])} | {r['why_not_chosen']} |"
            )
        lines.append("")
    return lines


def _figures(report: dict[str, Any]) -> list[str]:
    """The table of the exported file's figures beside the fp32 baseline's."""
    cand, fp32 = report["candidate"], report["fp32"]
    fp32_label = f"fp32 baseline (trial {fp32.get('trial')})" if fp32.get("trial") is not None \
        else "fp32 teacher"
    rows = [
        ("file size", _size(fp32.get("size_bytes")), _size(cand.get("size_bytes"))
         + (f" ({cand['times_smaller']:.2f}x smaller)" if cand.get("times_smaller") else "")),
        ("zipped size", _size(fp32.get("zip_size_bytes")), _size(cand.get("zip_size_bytes"))),
        ("latency (median ± IQR/2)", _latency_text(fp32), _latency_text(cand)),
        ("latency vs fp32 (interleaved)", _fmt(fp32.get("latency_vs_fp32"), ".3f"),
         _fmt(cand.get("latency_vs_fp32"), ".3f")
         + (f" ({_speed_text(cand['latency_vs_fp32'])})" if cand.get("latency_vs_fp32") else "")),
        ("accuracy, validation", _fmt(fp32.get("accuracy_val")), _fmt(cand.get("accuracy_val"))),
        ("accuracy, held-out test", _fmt(fp32.get("accuracy_test")),
         _fmt(cand.get("accuracy_test"))),
        ("accuracy-drop rate (val)", "0", _fmt(cand.get("accuracy_drop_rate_val"), ".2%")),
        ("accuracy-drop rate (test)", "0", _fmt(cand.get("accuracy_drop_rate_test"), ".2%")),
        ("FLOPs", _fmt(fp32.get("flops"), ",d"), _fmt(cand.get("flops"), ",d")),
        ("FLOP-reduction rate", "0", _fmt(cand.get("flop_reduction_rate"), ".2%")),
        ("bit-operation reduction", "0", _fmt(cand.get("bops_reduction_rate"), ".2%")),
        ("params", _fmt(fp32.get("params"), ",d"), _fmt(cand.get("params"), ",d")),
        ("weight types in file", _types(fp32.get("weight_types")),
         _types(cand.get("weight_types"))),
    ]
    lines = [f"| metric | {fp32_label} | exported (trial {report['trial']}) |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += [
        "",
        "Accuracy-drop rate and FLOP-reduction rate are (original - compressed) / original. "
        + ("Accuracy is measured by ExecuTorch on the exported model.pte."
           if _measured_file(report) == "model.pte" else
           "Accuracy is measured by ONNX Runtime on the exported file."),
        "",
    ]
    return lines


def _runtime(rt: dict[str, Any]) -> list[str]:
    return [
        f"**Runtime (as measured):** {rt.get('runtime', 'onnxruntime')} {rt.get('version', '')}"
        f", providers {rt.get('providers', ['CPUExecutionProvider'])}, intra-op threads "
        f"{rt.get('threads', '?')}, batch size {rt.get('batch_size', '?')}, session options "
        f"`{json.dumps(rt.get('session_options', {}))}`, execution "
        f"{rt.get('execution_mode', '?')}, graph optimization {rt.get('graph_optimization', '?')}"
        f", CPU {rt.get('cpu', '?')} ({rt.get('cpu_count', '?')} cores). Use the same session "
        "options to reproduce the latency.",
        "",
    ]


def _layers(layers: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Per layer",
        "",
        "| layer | type | bits | weights in file | prune ratio (group) | params before → after "
        "| FLOPs before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in layers:
        group = f"{row['prune_ratio']:.2f} ({row['prune_group']})" if row["prune_group"] else "-"
        lines.append(
            f"| {row['layer']} | {row['type']} | {row['bits']} | "
            f"{row['weights_in_file'] or '-'} | {group} | "
            f"{_fmt(row['params_before'], ',d')} → {_fmt(row['params_after'], ',d')} | "
            f"{_fmt(row['flops_before'], ',d')} → {_fmt(row['flops_after'], ',d')} |"
        )
    lines += ["", "Before: the study's inventory of the original model. After: the rebuilt "
              "model (pruned, BatchNorm folded into the conv, so a conv may gain a bias).", ""]
    return lines


def _verification(ver: dict[str, Any] | None) -> list[str]:
    lines = ["## Verification", ""]
    if ver is None:
        lines.append("Skipped (`--no-verify`): the figures above are the study's records.")
        return lines
    lat, name = ver["latency"], ver.get("file", "model.onnx")
    lines += [
        f"- `{name}` sha256 `{ver['sha256']}` equals the study's record.",
        f"- Test accuracy re-measured on the written file: {ver['test_accuracy']:.6f} "
        f"(recorded {ver['recorded_test_accuracy']}, tolerance {ver['accuracy_tolerance']:g}).",
        f"- `model.pt2` vs `{name}`: top-1 agreement {ver['agreement']:.2%} on "
        f"{ver['agreement_samples']} validation samples (floor {ver['agreement_floor']:.0%})"
        f"; max |logit difference| to the rebuilt model {ver['program_max_abs_diff']:.2e}.",
    ]
    if lat.get("skipped"):
        lines.append(f"- Latency not re-checked: {lat['skipped']}.")
    else:
        lines.append(
            f"- Latency re-measured interleaved with the fp32 baseline: "
            f"{lat['candidate']['median_ms']:.4f} ms vs {lat['fp32']['median_ms']:.4f} ms, "
            f"ratio {lat['ratio']:.3f} (recorded {lat['recorded_ratio']:.3f}; allowed "
            f"{lat['allowed'][0]:.3f}-{lat['allowed'][1]:.3f}: {lat['tolerance']}, because "
            "latency on shared machines drifts by tens of percent within minutes)."
        )
    return lines


def _fmt(value: Any, spec: str = ".4f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def _latency_text(row: dict[str, Any]) -> str:
    if row.get("latency_ms") is None:
        return "-"
    text = f"{row['latency_ms']:.4f} ms ± {(row.get('latency_spread_ms') or 0) / 2:.4f}"
    if row.get("latency_p10_ms") is not None and row.get("latency_p90_ms") is not None:
        text += f" (p10 {row['latency_p10_ms']:.4f}, p90 {row['latency_p90_ms']:.4f})"
    return text


def _size(n: Any) -> str:
    return "-" if not n else f"{format_bytes(n)} ({int(n):,d} B)"


def _types(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
