"""What every trial of one search shares (``SearchContext``), and the pre-check's result and
cache keys.

The context is built once per run by ``search/session.py:open_session`` (or by hand, as
``benchmarks/cifar10/trials.py`` does) and handed to the ``TrialRunner``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autocompress.config.budgets import Budget
from autocompress.config.settings import MeasurementSettings, SpaceSettings, TrainingSettings
from autocompress.intake import Task
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import measure, sessions, timing
from autocompress.runtime.latency_model import LatencyModel
from autocompress.runtime.latency_reference import ReferenceLatency, estimate_ms
from autocompress.train.teacher_cache import TeacherCache
from autocompress.transform import quantize
from autocompress.transform.quantize import executorch_lower

# The calibration set a search holds (``SearchContext.calibration``): this many batches of
# this many training images.
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 32


@dataclass
class Precheck:
    """Latency and size of one structure at its bit widths, before fine-tuning."""

    latency: measure.LatencyStats
    reference: measure.LatencyStats
    ratio: float
    size_bytes: int
    session_options: dict[str, str]
    estimate_ms: float  # the latency budgets are judged on (see latency_reference)
    careful: bool = False  # timed with the full interleaved look (not just the first one)


@dataclass
class SearchContext:
    """What every trial of one search shares. Built once by ``search/session.py``."""

    task: Task
    inventory: Inventory
    space: SpaceSettings
    training: TrainingSettings
    measurement: MeasurementSettings
    budgets: list[Budget]
    workdir: Path
    fp32_onnx: Path
    fp32_accuracy: float
    device: str
    calibration: list[torch.Tensor]
    upload: Callable[[Any, Path], str]
    precheck_cache: dict[str, Precheck] = field(default_factory=dict)
    # careful pre-check and final ratios per structure this run (pooled_ratio)
    structure_ratios: dict[str, list[float]] = field(default_factory=dict)
    # The study's fp32 latency on this machine. Without one (a context built by hand), a
    # budget is judged on each measurement's absolute median instead.
    reference: ReferenceLatency | None = None
    latency_model: LatencyModel = field(default_factory=LatencyModel)
    # Called with (step, total) after every fine-tune step (refine's progress bar).
    on_step: Callable[[int, int], None] | None = None
    # The study's shared fine-tune stream with the teacher's outputs on it (one seed per
    # study: training.seed), built here when not given; lazy, so it costs nothing unused.
    # Set it to None after construction to give every trial its own stream again.
    teacher_cache: TeacherCache | None = None
    # (artifact id, destination): fetch a stored file, e.g. a trained trial's weights that a
    # retrain in another process or worker inherits (trial/lineage.py); None: nothing stored
    download: Callable[[str, Path], None] | None = None
    # executorch-xnnpack: what each program written this run holds (``.pte`` path ->
    # ``executorch_lower.ProgramInfo.to_dict()``), for the trial that measures it
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.teacher_cache is None:
            self.teacher_cache = TeacherCache(self.task.data, self.training.batch_size,
                                              self.training.seed)
        if self.measurement.target == executorch_runtime.TARGET:
            self._reference_program()

    def _reference_program(self) -> None:
        """The fp32 program every candidate program is timed against: made beside
        ``fp32_onnx`` (``search/session.py`` makes it before the fp32 reference is timed;
        a context built by hand gets it here)."""
        path = self.fp32_program
        if str(path) in self.programs:
            return
        example = self.task.data.example_input(self.measurement.latency_batch_size)
        if not path.is_file():
            self.programs[str(path)] = executorch_lower.lower_program(
                self.task.model, example, path).to_dict()
        else:  # made by the session: what an fp32 lowering holds is float everywhere
            layers = executorch_lower.float_layers(self.task.model)
            self.programs[str(path)] = {"path": str(path), "weight_types": layers,
                                        "activations": dict(layers), "notes": {},
                                        "size_bytes": path.stat().st_size}

    @property
    def fp32_program(self) -> Path:
        """The study's fp32 ExecuTorch program (executorch-xnnpack target), beside fp32_onnx."""
        return executorch_runtime.program_path(self.fp32_onnx)

    @property
    def latency_shape(self) -> tuple[int, ...]:
        return (self.measurement.latency_batch_size, *self.task.input_shape)

    def budget_latency_ms(self, inter: timing.InterleavedLatency,
                          ratio: float | None = None) -> float:
        """The latency a budget is judged on: interleaved ratio (or ``ratio``, pooled over
        the structure's measurements) x the study's fp32 reference (the same estimator at
        the pre-check and at the final measurement)."""
        if self.reference is None:
            return inter.candidate.median_ms
        return estimate_ms(inter.ratio if ratio is None else ratio, self.reference)

    def budget_ratio(self) -> float | None:
        """The tightest latency budget as a ratio to fp32, or None without one."""
        if self.reference is None:
            return None
        limits = [b.value for b in self.budgets if b.kind == "latency"]
        return min(limits) / self.reference.median_ms if limits else None

    def runtime_info(self, options: dict[str, str]) -> dict[str, Any]:
        """The ``runtime`` a trial's latency was measured on, with its session options."""
        m = self.measurement
        return sessions.runtime_info(m.threads, m.latency_batch_size, options, m.target)


_DEFAULT_SCHEME = CompressionPlan().activation_scheme


def structure_key(plan: CompressionPlan) -> str:
    """What latency depends on: widths, pruning, activation precision (uint8 activations run
    integer kernels, weight-only ones float) and how the file is made (ORT's quantizer and
    dynamic quantization write other graphs than the QDQ export). A symmetric activation
    scheme (int8 activations, other kernels) keys apart; the default adds nothing, so keys
    stored by studies made before schemes existed still match."""
    made = plan.calibration if plan.is_ptq else "qdq"
    scheme = ({"scheme": plan.activation_scheme}
              if plan.activation_scheme != _DEFAULT_SCHEME else {})
    body = json.dumps({"bits": plan.bits, "prune": plan.prune,
                       "acts": plan.activation_bits, "made": made, **scheme}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def precheck_key(plan: CompressionPlan, baseline: str | None) -> str:
    """Pre-check cache key: baselines are exported by their own path, so they key apart;
    unstructured zeros do not change latency but do change the zipped size."""
    key = f"{baseline or 'search'}:{structure_key(plan)}"
    if plan.sparse:
        body = json.dumps([plan.sparsity, plan.global_sparsity], sort_keys=True)
        key += ":" + hashlib.sha256(body.encode()).hexdigest()[:8]
    return key


def runtime_quantized(plan: CompressionPlan) -> bool:
    """Dynamic quantization (activations quantized at run time): other kernels than the
    QDQ structures the latency model describes, so it neither predicts nor learns them."""
    return plan.is_ptq and plan.calibration == quantize.DYNAMIC
