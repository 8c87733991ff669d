"""One trial: plan -> build -> latency pre-check -> QAT+KD fine-tune -> export -> measure.

Every recorded figure is measured on the exported ONNX file that becomes the trial's
artifact (design rule 1). The pre-check exports the pruned structure at the planned bit widths
before any fine-tuning and rejects over-budget candidates cheaply (rule 4); its result is
cached by structure, because latency does not depend on fine-tuned weight values.

Early stopping (ours: multi-objective Optuna cannot prune): half-way and three-quarters of the
way through the fine-tune, a candidate whose fake-quant validation accuracy is more than
``early_stop_drop`` (absolute) below the fp32 teacher's is abandoned as hopeless and recorded
as a PRUNED trial with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.config.options import Budget, SearchConfig
from autocompress.errors import AutocompressError
from autocompress.intake import Task
from autocompress.model import space
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan
from autocompress.results import metrics
from autocompress.runtime import measure
from autocompress.runtime import ort as runtime
from autocompress.runtime.latency_model import LatencyModel, structure_features
from autocompress.runtime.latency_reference import ReferenceLatency, estimate_ms, pooled_ratio
from autocompress.study import TrialPruned
from autocompress.study import attrs as trial_attrs
from autocompress.train import tuning
from autocompress.transform import quantize
from autocompress.transform.student import (
    build_student,
    removes_weights,
    torch_accuracy,
)

log = logging.getLogger("autocompress")

PRECHECK_REPEATS = 7  # runs a side per round of the careful look (close verdicts, probes)
PRECHECK_FIRST_LOOK = 5  # runs per side of the first look, which settles clear verdicts
PRECHECK_CLEAR_MARGIN = 1.3  # "clear": every latency budget more than 30% away
# What the latency model learns from: 4 interleaved rounds. A first look (5 runs a side) put
# ResNet-20's own fp32 structure at 1.36x of the fp32 file and int8 pruned 50% slower than
# 25%; the model fitted on such looks erred by 13-16% (benchmarks/latency_model_fit.py).
# Six rounds, each a fresh session pair (``runtime.time_interleaved``): the verdict is a median
# over six placements, as is the final measurement's (MEASURE_ROUNDS), so a candidate
# cannot pass one and fail the other by one unlucky session.
PRECHECK_CAREFUL_ROUNDS = 6
MEASURE_ROUNDS = 5  # the trial's final measurement: latency_repeats split over this many
PRECHECK_CALIBRATION_IMAGES = 4
EARLY_STOP_BATCHES = 4  # x 256 validation images per early-stop evaluation
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
    """What every trial of one search shares. Built once by ``search.py``."""

    task: Task
    inventory: Inventory
    config: SearchConfig
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

    @property
    def latency_shape(self) -> tuple[int, ...]:
        return (self.config.latency_batch_size, *self.task.input_shape)

    def budget_latency_ms(self, inter: runtime.InterleavedLatency,
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


class _Timer:
    """Seconds per phase, for the ``timing`` attribute."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def structure_key(plan: CompressionPlan) -> str:
    """What latency depends on: widths, pruning, activation precision (uint8 activations run
    integer kernels, weight-only ones float) and how the file is made (ORT's quantizer and
    dynamic quantization write other graphs than the QDQ export)."""
    made = plan.calibration if plan.is_ptq else "qdq"
    body = json.dumps({"bits": plan.bits, "prune": plan.prune,
                       "acts": plan.activation_bits, "made": made}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class TrialRunner:
    """Callable objective for ``study.optimize``: returns the objective values."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    # -- the trial ------------------------------------------------------------------------

    def __call__(self, trial: Any) -> tuple[float, ...]:
        ctx = self.ctx
        timer = _Timer()
        baseline = trial.user_attrs.get(trial_attrs.BASELINE)
        plan = space.suggest_plan(trial, ctx.inventory, ctx.config)
        steps = trial.user_attrs.get(trial_attrs.FINETUNE_STEPS)
        if steps is not None:  # a promotion or a refine: the parent's plan, trained longer
            plan = dataclasses.replace(plan, finetune_steps=int(steps))
        trial.set_user_attr(trial_attrs.PLAN, plan.to_json())
        trial.set_user_attr(trial_attrs.PLAN_SUMMARY, plan.summary())
        out_dir = ctx.workdir / f"trial-{trial.number}"
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(trial, plan, baseline, timer, out_dir)
        except TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(trial_attrs.FAIL_REASON, "interrupted (Ctrl-C or SIGTERM)")
            raise
        except AutocompressError as exc:
            trial.set_user_attr(trial_attrs.FAIL_REASON, str(exc))
            raise
        except Exception as exc:
            trial.set_user_attr(trial_attrs.FAIL_REASON, f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            trial.set_user_attr(trial_attrs.TIMING, json.dumps(timer.seconds))

    def _run(
        self,
        trial: Any,
        plan: CompressionPlan,
        baseline: str | None,
        timer: _Timer,
        out_dir: Path,
    ) -> tuple[float, ...]:
        ctx = self.ctx
        with timer.phase("build"):
            # Structure only: the pre-check needs shapes and bit widths, not tuned values.
            student = build_student(ctx.task, plan, ctx.config.round_to)

        with timer.phase("precheck"):
            predicted = self._predict_ratio(trial, student, plan, baseline)
            if ctx.latency_model.should_skip(predicted, ctx.budget_ratio()):
                self._reject_predicted(trial, predicted)
            pre = self.precheck(student, plan, baseline, out_dir)
            if predicted is not None:
                ctx.latency_model.record_check(predicted, pre.ratio)
        broken = self._broken_budgets(pre.estimate_ms, pre.size_bytes)
        # A trial queued with its own step count (a promotion, a refine, evaluate_plan) was
        # asked for by name: measured even over budget, fine-tuned to the end.
        retrain = trial_attrs.FINETUNE_STEPS in trial.user_attrs
        if broken and baseline is None and not retrain:
            self._reject(trial, pre, broken)
        # Baselines cost no fine-tune: they are measured even over budget (recorded as
        # infeasible), so the study always knows the teacher's and plain PTQ's accuracy.
        # So is a retrain of a plan measured within budget: a noisy pre-check must not throw
        # away the long fine-tune someone asked for.
        trial.set_user_attr(trial_attrs.PRECHECK_LATENCY_ESTIMATE, pre.estimate_ms)

        if baseline is None and removes_weights(plan):
            with timer.phase("build"):  # within budget: now worth re-estimating BN statistics
                student = build_student(  # unfolded when a recovery phase trains through BN
                    ctx.task, plan, ctx.config.round_to, bn_batches=self._bn_batches(trial),
                    fold=not tuning.recovers(plan))

        qat: nn.Module | None = None
        # A PTQ plan has no fine-tune: ONNX Runtime calibrates the float student at export.
        if baseline is None and plan.finetune_steps > 0 and not plan.is_ptq:
            with timer.phase("finetune"):
                student, qat, stopped = self._finetune(trial, student, plan,
                                                       early_stop=not retrain)
            if stopped:
                self._set_constraints(trial, pre.estimate_ms, pre.size_bytes)
                trial.set_user_attr(trial_attrs.EARLY_STOPPED, stopped)
                raise TrialPruned(stopped)

        with timer.phase("export"):
            if baseline is None and qat is None and not plan.is_ptq:  # zero fine-tune steps
                qat = self._untrained_qat(student, plan)
            artifact = self._export(student, qat, plan, baseline, out_dir)
            # The PyTorch side of the candidate (fine-tuned weights) for `export`/`rebuild`.
            torch_state = out_dir / "student.pt"
            torch.save((qat if qat is not None else student).state_dict(), torch_state)

        with timer.phase("measure"):
            values = self._measure(trial, artifact, student, plan, pre,
                                   _precheck_key(plan, baseline))
            trial.set_user_attr(trial_attrs.TORCH_KIND, "float" if qat is None else "qat")
            trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_SHA256, measure.sha256_file(torch_state))
            trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_ID, ctx.upload(trial, torch_state))
        return values

    # -- phases ---------------------------------------------------------------------------

    def precheck(
        self, student: nn.Module, plan: CompressionPlan, baseline: str | None, out_dir: Path,
        *, careful: bool = False,
    ) -> Precheck:
        """Size and latency of the structure (cached by structure). ``careful``: always the
        full interleaved look, as the latency model's probes need."""
        ctx = self.ctx
        key = _precheck_key(plan, baseline)
        cached = ctx.precheck_cache.get(key)
        if cached is not None and (cached.careful or not careful):
            return cached
        out_dir.mkdir(parents=True, exist_ok=True)
        # Latency and bytes do not depend on quantization scales: observers and ORT calibrate
        # on a few images only (on a 224x224 resnet18 the full calibration set cost seconds).
        few = [ctx.calibration[0][:PRECHECK_CALIBRATION_IMAGES]]
        path = self._export(
            student, None, plan, baseline, out_dir, name="precheck.onnx", calibration=few
        )
        size = self._objective_size(path)
        # A choice between two variants (2x apart when it matters): a short interleaved look.
        # Files without QDQ nodes run the same either way.
        options: dict[str, str] = {}
        if runtime.has_qdq(path):
            options, _ = runtime.pick_session_options(
                path, ctx.latency_shape, threads=ctx.config.threads, rounds=2, repeats=5,
                target=ctx.config.target,
            )

        def look(rounds: int, repeats: int) -> runtime.InterleavedLatency:
            return runtime.time_interleaved(
                path,
                ctx.fp32_onnx,
                ctx.latency_shape,
                threads=ctx.config.threads,
                candidate_options=options,
                reference_options={},
                rounds=rounds,
                repeats=repeats,
                target=ctx.config.target,
            )

        # Clear verdicts are cheap, close calls get the full measurement: a candidate far
        # over (or far under) every latency budget needs no 40 runs to say so.
        if careful:
            inter = look(PRECHECK_CAREFUL_ROUNDS, PRECHECK_REPEATS)
        else:
            inter = look(1, PRECHECK_FIRST_LOOK)
            careful = not clear_verdict(ctx.budgets, ctx.budget_latency_ms(inter), size)
            if careful:
                inter = look(PRECHECK_CAREFUL_ROUNDS, PRECHECK_REPEATS)
        result = Precheck(
            latency=inter.candidate,
            reference=inter.reference,
            ratio=inter.ratio,
            size_bytes=size,
            session_options=options,
            estimate_ms=ctx.budget_latency_ms(inter),
            careful=careful,
        )
        ctx.precheck_cache[key] = result
        if careful:  # a careful look is one of the structure's measurements (pooled_ratio)
            ctx.structure_ratios.setdefault(key, []).append(inter.ratio)
        # The model learns from careful looks only, and not from ORT's own quantizer's file
        # (another export path than ours).
        if careful and baseline in (None, "fp32") and not _runtime_quantized(plan):
            features = structure_features(student, plan, ctx.inventory, ctx.task.model)
            ctx.latency_model.observe(key, features, inter.ratio)
        return result

    def _predict_ratio(
        self, trial: Any, student: nn.Module, plan: CompressionPlan, baseline: str | None
    ) -> float | None:
        """The latency model's ratio for this structure, recorded on the trial, when the
        model is fitted, a latency budget exists and the structure was never measured."""
        ctx = self.ctx
        key = _precheck_key(plan, baseline)
        if (baseline is not None or key in ctx.precheck_cache or ctx.budget_ratio() is None
                or _runtime_quantized(plan)):
            return None
        features = structure_features(student, plan, ctx.inventory, ctx.task.model)
        predicted = ctx.latency_model.predict(features)
        if predicted is not None:
            trial.set_user_attr(trial_attrs.LATENCY_PREDICTED_VS_FP32, predicted)
        return predicted

    def _broken_budgets(self, latency_ms: float, size_bytes: float) -> dict[str, float]:
        return {
            b.text: b.violation(latency_ms, size_bytes)
            for b in self.ctx.budgets
            if b.violation(latency_ms, size_bytes) > 0
        }

    def _set_constraints(
        self, trial: Any, latency_ms: float, size_bytes: float, *, only_latency: bool = False
    ) -> bool:
        """Set every budget as an Optuna constraint (on every path); True when all are met.
        ``only_latency``: the size is unknown (a predicted rejection); size budgets get 0."""
        values = {
            b.text: (0.0 if only_latency and b.kind == "size"
                     else b.violation(latency_ms, size_bytes))
            for b in self.ctx.budgets
        }
        if not values:
            values = {"none": -1.0}  # a trial with no constraint must still say it is feasible
        for name, value in values.items():
            trial.set_constraint(name, value)
        feasible = all(v <= 0 for v in values.values())
        trial.set_user_attr(trial_attrs.CONSTRAINTS, json.dumps(values))
        trial.set_user_attr(trial_attrs.FEASIBLE, feasible)
        return feasible

    def _reject(self, trial: Any, pre: Precheck, broken: dict[str, float]) -> None:
        """Over budget before any fine-tune: record why and the pre-check figures, stop.

        Recorded as PRUNED with its constraints and no objective values: nothing was
        measured, so the sampler must not learn an accuracy for it. TPE (the default) sorts
        such trials by their constraint violation; NSGA-II and GP read COMPLETE trials only
        and ignore them (they learn the budget from measured trials instead)."""
        ctx = self.ctx
        self._set_constraints(trial, pre.estimate_ms, pre.size_bytes)
        reasons = [
            b.describe(pre.estimate_ms, pre.size_bytes)
            for b in ctx.budgets
            if b.text in broken
        ]
        text = "over budget at pre-check: " + "; ".join(reasons)
        if ctx.reference is not None and any(b.kind == "latency" for b in ctx.budgets):
            text += f" (x{pre.ratio:.2f} of fp32 x {ctx.reference.median_ms:.3g} ms reference)"
        trial.set_user_attr(trial_attrs.REJECTED, text)
        trial.set_user_attr(trial_attrs.SIZE, pre.size_bytes)
        trial.set_user_attr(trial_attrs.LATENCY, pre.latency.median_ms)
        trial.set_user_attr(trial_attrs.LATENCY_SPREAD, pre.latency.spread_ms)
        trial.set_user_attr(trial_attrs.LATENCY_VS_FP32, pre.ratio)
        trial.set_user_attr(trial_attrs.LATENCY_ESTIMATE, pre.estimate_ms)
        trial.set_user_attr(trial_attrs.FP32_LATENCY, pre.reference.median_ms)
        if ctx.reference is not None:
            trial.set_user_attr(trial_attrs.FP32_REFERENCE, ctx.reference.median_ms)
        trial.set_user_attr(trial_attrs.RUNTIME, json.dumps(self._runtime(pre.session_options)))
        raise TrialPruned(text)

    def _reject_predicted(self, trial: Any, predicted: float | None) -> None:
        """Far over the latency budget by the study's latency model: recorded as rejected
        without a pre-check (no file was exported or timed; the figures are a prediction)."""
        ctx = self.ctx
        if predicted is None or ctx.reference is None:  # should_skip never says so; be safe
            return
        estimate = estimate_ms(predicted, ctx.reference)
        self._set_constraints(trial, estimate, 0.0, only_latency=True)
        reasons = [b.describe(estimate, 0.0) for b in ctx.budgets if b.kind == "latency"]
        text = ("predicted over budget by the latency model (not measured): "
                + "; ".join(reasons) + f" (x{predicted:.2f} of fp32 predicted)")
        trial.set_user_attr(trial_attrs.REJECTED, text)
        trial.set_user_attr(trial_attrs.REJECTED_BY_MODEL, True)
        trial.set_user_attr(trial_attrs.LATENCY_ESTIMATE, estimate)
        trial.set_user_attr(trial_attrs.FP32_REFERENCE, ctx.reference.median_ms)
        raise TrialPruned(text)

    def _finetune(
        self, trial: Any, student: nn.Module, plan: CompressionPlan, *, early_stop: bool = True
    ) -> tuple[nn.Module, nn.Module, str | None]:
        """Recovery (plans that prune) and QAT + KD from the teacher (``tuning``); returns the
        folded student, the QAT model and the early-stop reason, if any (``early_stop=False``:
        a retrain of a plan that earned it runs to the end)."""
        ctx = self.ctx

        def evaluate(model: nn.Module) -> float:
            # A coarse look is enough to call a candidate hopeless: a fixed slice of the
            # validation split (on CIFAR-10 the full 5,000 images cost more than the
            # fine-tune itself). Recorded accuracy is always the exported file's, on all of it.
            return torch_accuracy(model, itertools.islice(
                ctx.task.data.batches("val", 256), EARLY_STOP_BATCHES), ctx.task.metric)

        result = tuning.finetune_trial(student, ctx.task.model, ctx.task.data, plan,
                                       tuning.TrialTuning(
            batch_size=ctx.config.batch_size, device=str(ctx.device),
            seed=ctx.config.seed + trial.number,
            floor=ctx.fp32_accuracy - ctx.config.early_stop_drop, evaluate=evaluate,
            make_qat=lambda folded: self._untrained_qat(folded, plan), early_stop=early_stop,
            progress=ctx.on_step, loss=ctx.task.loss))
        trial.set_user_attr(trial_attrs.FINETUNE_STEPS_RUN, result.steps)
        if result.recovery_steps:
            trial.set_user_attr(trial_attrs.RECOVERY_STEPS, result.recovery_steps)
        return result.student, result.qat, result.stopped

    def _export(
        self,
        student: nn.Module,
        qat: nn.Module | None,
        plan: CompressionPlan,
        baseline: str | None,
        out_dir: Path,
        name: str = "model.onnx",
        calibration: list[torch.Tensor] | None = None,
    ) -> Path:
        ctx = self.ctx
        calibration = ctx.calibration if calibration is None else calibration
        path = out_dir / name
        example = ctx.task.data.example_input(1)
        if baseline == "fp32":
            path.write_bytes(ctx.fp32_onnx.read_bytes())
            return path
        if baseline == "int8-ptq":
            quantize.ptq_static(ctx.fp32_onnx, path, calibration, weight_bits=8)
            return path
        if baseline == "int8-dynamic":  # the guide's first recipe: int8 weights, activations
            quantize.ptq_dynamic(ctx.fp32_onnx, path)  # quantized at run time
            return path
        if plan.is_ptq:  # the float student, activations calibrated by ONNX Runtime
            info = quantize.export_onnx(student, example, path, plan, calibration,
                                        calibration_method=plan.calibration)
            return Path(info.path)
        if qat is None:
            qat = self._untrained_qat(student, plan, calibration)
        info = quantize.export_onnx(qat, example, path, plan, calibration)
        return Path(info.path)

    def _measure(
        self,
        trial: Any,
        artifact: Path,
        student: nn.Module,
        plan: CompressionPlan,
        pre: Precheck,
        structure: str,
    ) -> tuple[float, ...]:
        ctx = self.ctx
        cfg = ctx.config
        threads = cfg.threads
        # Accuracy under the same session options as the recorded latency: the options change
        # the arithmetic (disable_quant_qdq folds int4 weights to float at load). Scoring is
        # throughput work, not a timing: it may use the fine-tune's threads (on CIFAR-10 the
        # 15,000 val + test images took a third of a 40-step trial at one thread).
        options = pre.session_options
        scoring = max(threads, cfg.train_threads)
        accuracy = runtime.onnx_accuracy(
            artifact, ctx.task.data.batches("val", 256), threads=scoring, session_options=options,
            target=cfg.target, metric=ctx.task.metric)
        test_accuracy = runtime.onnx_accuracy(
            artifact, ctx.task.data.batches("test", 256), threads=scoring,
            session_options=options, target=cfg.target, metric=ctx.task.metric)
        inter = runtime.time_interleaved(
            artifact,
            ctx.fp32_onnx,
            ctx.latency_shape,
            threads=threads,
            candidate_options=pre.session_options,
            reference_options={},
            rounds=MEASURE_ROUNDS,
            repeats=max(1, cfg.latency_repeats // MEASURE_ROUNDS),
            target=cfg.target,
        )
        size, zipped = measure.file_size(artifact), measure.zipped_size(artifact)
        objective_size = zipped if cfg.size_metric == "zip" else size
        earlier = ctx.structure_ratios.setdefault(structure, [])
        estimate = ctx.budget_latency_ms(inter, pooled_ratio(inter.ratio, earlier))
        trial.set_user_attr(trial_attrs.LATENCY_POOLED, len(earlier) + 1)
        earlier.append(inter.ratio)
        example = ctx.task.data.example_input(1)
        attrs: dict[str, Any] = {
            trial_attrs.ACCURACY: accuracy,
            trial_attrs.TEST_ACCURACY: test_accuracy,
            trial_attrs.SIZE: size,
            trial_attrs.ZIP_SIZE: zipped,
            trial_attrs.SIZE_METRIC: cfg.size_metric,
            trial_attrs.LATENCY: inter.candidate.median_ms,
            trial_attrs.LATENCY_SPREAD: inter.candidate.spread_ms,
            trial_attrs.LATENCY_P10: inter.candidate.p10_ms,
            trial_attrs.LATENCY_P90: inter.candidate.p90_ms,
            trial_attrs.LATENCY_VS_FP32: inter.ratio,
            trial_attrs.LATENCY_ESTIMATE: estimate,
            trial_attrs.FP32_LATENCY: inter.reference.median_ms,
            trial_attrs.RUNTIME: json.dumps(self._runtime(pre.session_options)),
            trial_attrs.FLOPS: measure.count_flops(student, example),
            trial_attrs.BOPS: metrics.bit_operations(metrics.layer_macs(student, example), plan),
            trial_attrs.PARAMS: measure.count_params(student),
            trial_attrs.WEIGHT_TYPES: json.dumps(quantize.onnx_weight_types(artifact)),
            trial_attrs.ARTIFACT_SHA256: measure.sha256_file(artifact),
        }
        if ctx.reference is not None:
            attrs[trial_attrs.FP32_REFERENCE] = ctx.reference.median_ms
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self._set_constraints(trial, estimate, objective_size)
        # Upload while the trial is RUNNING (Optuna writes metadata before the file).
        trial.set_user_attr(trial_attrs.ARTIFACT_ID, ctx.upload(trial, artifact))
        return self._values(accuracy, objective_size, estimate)

    # -- helpers --------------------------------------------------------------------------

    def _untrained_qat(
        self,
        student: nn.Module,
        plan: CompressionPlan,
        calibration: list[torch.Tensor] | None = None,
    ) -> nn.Module:
        """Fake-quant model at the plan's widths with calibrated observers, no fine-tune."""
        qat = quantize.prepare_qat(student, plan)
        # Observers from real data, in eval mode (BatchNorm left unfolded keeps its statistics).
        quantize.calibrate(qat, self.ctx.calibration if calibration is None else calibration)
        return qat

    def _objective_size(self, path: Path) -> int:
        """The bytes the size objective and size budgets count (config.size_metric)."""
        zipped = self.ctx.config.size_metric == "zip"
        return measure.zipped_size(path) if zipped else measure.file_size(path)

    def _bn_batches(self, trial: Any) -> Iterator[torch.Tensor]:
        """Training inputs for BatchNorm re-estimation after pruning; seeded per trial like
        the fine-tune, so a trial rebuilt from its number sees the same images."""
        cfg = self.ctx.config
        batches = self.ctx.task.data.batches(
            "train", cfg.batch_size, shuffle=True, seed=cfg.seed + trial.number
        )
        return (x for x, _ in batches)

    def _values(self, accuracy: float, size: float, latency: float) -> tuple[float, ...]:
        by_name = {"accuracy": accuracy, "size": float(size), "latency": latency}
        return tuple(by_name[o] for o in self.ctx.config.objectives)

    def _runtime(self, options: dict[str, str]) -> dict[str, Any]:
        cfg = self.ctx.config
        return runtime.runtime_info(cfg.threads, cfg.latency_batch_size, options, cfg.target)


def clear_verdict(budgets: list[Budget], latency_ms: float, size_bytes: float) -> bool:
    """True when a short latency look is enough to judge a structure: a size budget (known
    exactly) is broken, or every latency budget lies more than PRECHECK_CLEAR_MARGIN away."""
    if any(b.kind == "size" and b.violation(latency_ms, size_bytes) > 0 for b in budgets):
        return True
    return all(
        not 1 / PRECHECK_CLEAR_MARGIN < latency_ms / b.value < PRECHECK_CLEAR_MARGIN
        for b in budgets
        if b.kind == "latency"
    )


def _precheck_key(plan: CompressionPlan, baseline: str | None) -> str:
    """Pre-check cache key: baselines are exported by their own path, so they key apart;
    unstructured zeros do not change latency but do change the zipped size."""
    key = f"{baseline or 'search'}:{structure_key(plan)}"
    if plan.sparse:
        body = json.dumps([plan.sparsity, plan.global_sparsity], sort_keys=True)
        key += ":" + hashlib.sha256(body.encode()).hexdigest()[:8]
    return key


def _runtime_quantized(plan: CompressionPlan) -> bool:
    """Dynamic quantization (activations quantized at run time): other kernels than the
    QDQ structures the latency model describes, so it neither predicts nor learns them."""
    return plan.is_ptq and plan.calibration == quantize.DYNAMIC
