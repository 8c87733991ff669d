"""Per-layer profile of a PyTorch model: output shape, params, FLOPs and latency share.

Used by ``autocompress profile`` to show where a model's size and time go before a search:

    report = profile_model(model, example_input, repeats=20)
    print(format_table(report))      # or report.to_json() / report.to_csv()

Numbers and their meaning
- FLOPs are fvcore counts (``model.flops``): one multiply-add counts as ONE flop (not two),
  fused attention included. Work done by functional ops or non-leaf modules (the attention
  inside ``nn.MultiheadAttention``) is the ``(unattributed)`` row. Ops fvcore has no formula
  for that are not elementwise are named in the notes, with their call counts.
- Latency: PyTorch eager on the CPU with the caller's thread count (never changed here).
  Each leaf module is timed with forward pre/post hooks (time.perf_counter); a layer called
  several times per forward (a shared ReLU) sums its calls. Shares are of the whole hooked
  forward (median over ``repeats``), so time outside leaf layers is not spread over them: it
  is the ``(unattributed)`` row. Hooks add overhead, so the un-hooked end-to-end forward
  median is reported separately (``forward_ms``). This is a guide to where time goes, not
  the deployment latency: ``profile_onnx`` profiles the exported file in ONNX Runtime.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from autocompress.errors import InputError
from autocompress.intake.outputs import first_tensor

__all__ = ["LayerProfile", "ProfileReport", "format_table", "profile_model"]

_WARMUP = 2
_ROOT_NAME = "(model)"  # row name when the model itself is a single leaf module
UNATTRIBUTED = "(unattributed)"  # functional ops and non-leaf modules' own work
FLOPS_NOTE = "FLOPs counted by fvcore: one multiply-add = 1 flop"


@dataclass
class LayerProfile:
    """One leaf layer. output_shape is that of its (first) output tensor, [] if none."""

    name: str
    type: str
    output_shape: list[int]
    params: int
    flops: int
    calls: int
    latency_ms: float
    latency_share: float  # percent of the whole (hooked) forward


@dataclass
class ProfileReport:
    rows: list[LayerProfile]
    total_params: int
    total_flops: int  # fvcore total(), including unattributed work
    unattributed_flops: int
    forward_ms: float  # un-hooked end-to-end forward, median over repeats
    leaf_ms: float  # sum of per-layer medians (hooked)
    repeats: int
    threads: int
    input_shape: list[int]
    notes: list[str] = field(default_factory=list)
    hooked_forward_ms: float = 0.0  # the whole hooked forward, median (shares are of this)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileReport:
        data = dict(data)
        data["rows"] = [LayerProfile(**row) for row in data["rows"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ProfileReport:
        return cls.from_dict(json.loads(text))

    def to_csv(self) -> str:
        """One line per leaf layer (totals are in the JSON and the table, not here, so a
        spreadsheet can sum columns without double counting). Shapes are written 1x64x56x56.
        """
        out = io.StringIO()
        names = [f.name for f in fields(LayerProfile)]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            record = asdict(row)
            record["output_shape"] = _shape_text(row.output_shape)
            writer.writerow(record)
        return out.getvalue()

    @staticmethod
    def rows_from_csv(text: str) -> list[LayerProfile]:
        rows = []
        for rec in csv.DictReader(io.StringIO(text)):
            shape = rec["output_shape"]
            rows.append(
                LayerProfile(
                    name=rec["name"],
                    type=rec["type"],
                    output_shape=[int(d) for d in shape.split("x")] if shape else [],
                    params=int(rec["params"]),
                    flops=int(rec["flops"]),
                    calls=int(rec["calls"]),
                    latency_ms=float(rec["latency_ms"]),
                    latency_share=float(rec["latency_share"]),
                )
            )
        return rows


def _shape_text(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    leaves = [(name, mod) for name, mod in model.named_modules() if not any(mod.children())]
    return [(name or _ROOT_NAME, mod) for name, mod in leaves]


def _time_forward(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_model(
    model: nn.Module, example_input: torch.Tensor, *, repeats: int = 20
) -> ProfileReport:
    """Profile every leaf module of ``model`` on ``example_input`` (a batched tensor).

    The model runs in eval mode under no_grad and is returned to its previous mode.
    """
    if repeats < 1:
        raise InputError(f"repeats {repeats} must be >= 1 (try 20)")
    if not isinstance(example_input, torch.Tensor):
        raise InputError(
            f"example_input must be a tensor such as torch.randn(1, 3, 224, 224), "
            f"not {type(example_input).__name__}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _profile(model, example_input, repeats)
    finally:
        model.train(was_training)


def _profile(model: nn.Module, x: torch.Tensor, repeats: int) -> ProfileReport:
    from autocompress.model import flops

    leaves = _leaf_modules(model)
    counts = flops.count(model, x)
    total_flops = counts.total

    # Un-hooked end-to-end forward first, so hook overhead cannot leak into it.
    _time_forward(model, x, _WARMUP)
    forward_ms = statistics.median(_time_forward(model, x, repeats))

    runs = _hooked_runs(model, x, leaves, repeats)
    medians = {name: statistics.median(values) for name, values in runs.samples.items()}
    leaf_ms = sum(medians.values())
    # The median whole forward can fall below the sum of per-layer medians by noise: never
    # let a share exceed the whole.
    hooked_ms = max(statistics.median(runs.whole), leaf_ms)
    rows = _layer_rows(leaves, runs, medians, counts.by_module, hooked_ms)
    unique_params = {id(p): p.numel() for p in model.parameters()}
    attributed = sum(row.flops for row in rows)
    rest_ms = hooked_ms - leaf_ms
    # Always present, so every report has the same rows: whether the per-layer medians sum
    # past the median whole forward (rest 0) is timing noise (a loaded machine flipped it).
    rows.append(LayerProfile(
        name=UNATTRIBUTED, type="functional ops, non-leaf modules", output_shape=[],
        params=0, flops=total_flops - attributed, calls=1, latency_ms=rest_ms,
        latency_share=100.0 * rest_ms / hooked_ms if hooked_ms > 0 else 0.0))
    return ProfileReport(
        rows=rows,
        total_params=sum(unique_params.values()),
        total_flops=total_flops,
        unattributed_flops=total_flops - attributed,
        forward_ms=forward_ms,
        leaf_ms=leaf_ms,
        hooked_forward_ms=hooked_ms,
        repeats=repeats,
        threads=torch.get_num_threads(),
        input_shape=list(x.shape),
        notes=_notes(model, rows, repeats, hooked_ms, counts.heavy_uncounted),
    )


@dataclass
class _HookedRuns:
    """What the hooked forwards measured: per leaf layer its time in each forward (ms), the
    whole hooked forwards (ms), its calls in the last forward and its first output's shape."""

    samples: dict[str, list[float]]
    whole: list[float]
    calls: dict[str, int]
    shapes: dict[str, list[int]]


def _hooked_runs(
    model: nn.Module, x: torch.Tensor, leaves: list[tuple[str, nn.Module]], repeats: int
) -> _HookedRuns:
    """Time every leaf layer with forward pre/post hooks over ``_WARMUP + repeats`` forwards
    (the warm-up ones are not kept); the hooks are removed afterwards."""
    per_forward: dict[str, float] = {name: 0.0 for name, _ in leaves}
    calls: dict[str, int] = {name: 0 for name, _ in leaves}
    shapes: dict[str, list[int]] = {}
    starts: dict[str, float] = {}
    handles = []

    def pre_hook(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_m: nn.Module, _inputs: Any) -> None:
            starts[name] = time.perf_counter()

        return hook

    def post_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
            per_forward[name] += time.perf_counter() - starts[name]
            calls[name] += 1
            if name not in shapes:
                tensor = first_tensor(output)
                shapes[name] = list(tensor.shape) if tensor is not None else []

        return hook

    samples: dict[str, list[float]] = {name: [] for name, _ in leaves}
    whole: list[float] = []
    try:
        for name, mod in leaves:
            handles.append(mod.register_forward_pre_hook(pre_hook(name)))
            handles.append(mod.register_forward_hook(post_hook(name)))
        for i in range(_WARMUP + repeats):
            for name in per_forward:
                per_forward[name] = 0.0
                calls[name] = 0
            start = time.perf_counter()
            model(x)
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= _WARMUP:
                whole.append(elapsed)
                for name, seconds in per_forward.items():
                    samples[name].append(seconds * 1e3)
    finally:
        for handle in handles:
            handle.remove()
    return _HookedRuns(samples=samples, whole=whole, calls=calls, shapes=shapes)


def _layer_rows(
    leaves: list[tuple[str, nn.Module]],
    runs: _HookedRuns,
    medians: dict[str, float],
    flops_by_module: dict[str, int],
    hooked_ms: float,
) -> list[LayerProfile]:
    rows = []
    for name, mod in leaves:
        key = "" if name == _ROOT_NAME else name
        rows.append(
            LayerProfile(
                name=name,
                type=type(mod).__name__,
                output_shape=runs.shapes.get(name, []),
                params=sum(p.numel() for p in mod.parameters(recurse=False)),
                flops=flops_by_module.get(key, 0),
                calls=runs.calls[name],
                latency_ms=medians[name],
                latency_share=100.0 * medians[name] / hooked_ms if hooked_ms > 0 else 0.0,
            )
        )
    return rows


def _notes(
    model: nn.Module, rows: list[LayerProfile], repeats: int, hooked_ms: float,
    heavy: dict[str, int],
) -> list[str]:
    """The units (first two) and the warnings: uncounted FLOPs, fused or unused layers."""
    notes = [
        FLOPS_NOTE,
        f"latency: PyTorch eager, median of {repeats} hooked forwards per layer; shares are "
        f"of the whole hooked forward ({hooked_ms:.3f} ms), the rest is {UNATTRIBUTED}",
    ]
    if heavy:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(heavy.items()))
        notes.append(f"FLOPs not counted (no formula in fvcore, not elementwise): {ops}; the "
                     "total leaves their work out")
    modules = dict(model.named_modules())
    # nn.MultiheadAttention computes with its out_proj's weights inside one fused kernel
    # (eval, no_grad) without calling it: used, and counted in the unattributed row.
    fused = [row.name for row in rows if row.calls == 0 and isinstance(
        modules.get(row.name.rpartition(".")[0]), nn.MultiheadAttention)]
    unused = [row.name for row in rows if row.calls == 0 and row.name not in fused]
    if fused:
        notes.append(f"{len(fused)} layer(s) run inside their parent's fused attention "
                     f"kernel, counted in {UNATTRIBUTED}: {', '.join(fused[:4])}"
                     + (", ..." if len(fused) > 4 else ""))
    if unused:
        notes.append(f"{len(unused)} layer(s) never called in forward: {', '.join(unused[:8])}")
    return notes


# -- text table --------------------------------------------------------------------------


def _si(value: float) -> str:
    """1819065856 -> '1.82G'; small values stay exact."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}"


def format_table(report: ProfileReport) -> str:
    """Plain-text table (rich, no colour codes) with totals and a footer explaining units."""
    lines = [
        _render_table(report),
        "",
        f"FLOPs total {report.total_flops:,} (fvcore: one multiply-add = 1 flop, attention "
        "included)"
        + (
            f"; {report.unattributed_flops:,} in functional ops and non-leaf modules"
            if report.unattributed_flops
            else ""
        ),
        f"latency: median of {report.repeats} hooked forwards per layer, shares of the whole "
        f"hooked forward {report.hooked_forward_ms or report.leaf_ms:.3f} ms; end-to-end "
        "forward without hooks "
        f"{report.forward_ms:.3f} ms (median), {report.threads} thread(s), input "
        f"{_shape_text(report.input_shape)}, PyTorch eager",
        *report.notes[2:],  # the first two restate the units said above; the rest are warnings
    ]
    return "\n".join(lines) + "\n"


def _render_table(report: ProfileReport) -> str:
    """The rows and the TOTAL footer as rich renders them, without colour or trailing blanks."""
    from rich.console import Console  # lazy: only the CLI's table output needs rich
    from rich.table import Table

    table = Table(show_footer=True, box=None, pad_edge=False, header_style="bold")
    total_share = sum(row.latency_share for row in report.rows)
    columns = [
        ("layer", "TOTAL", "left"),
        ("type", "", "left"),
        ("output", "", "left"),
        ("params", f"{report.total_params:,}", "right"),
        ("FLOPs", _si(report.total_flops), "right"),
        ("ms", f"{report.hooked_forward_ms or report.leaf_ms:.3f}", "right"),
        ("latency %", f"{total_share:.1f}", "right"),
    ]
    for header, footer, justify in columns:
        table.add_column(header, footer=footer, justify=justify)  # type: ignore[arg-type]
    for row in report.rows:
        table.add_row(
            row.name,
            row.type,
            _shape_text(row.output_shape),
            f"{row.params:,}",
            _si(row.flops),
            f"{row.latency_ms:.3f}",
            f"{row.latency_share:.1f}",
        )
    # Wide enough that rich never truncates a layer name (the output may go to a file).
    longest = max(
        (len(r.name) + len(r.type) + len(_shape_text(r.output_shape)) for r in report.rows),
        default=0,
    )
    width = max(100, longest + 70)
    console = Console(
        file=io.StringIO(),
        width=width,
        no_color=True,
        force_terminal=False,
        color_system=None,
        highlight=False,
    )
    console.print(table)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return text.rstrip()
