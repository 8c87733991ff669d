"""One trial: plan -> build -> latency pre-check -> QAT+KD fine-tune -> export -> measure.

``TrialRunner`` runs the steps in order and records why a trial failed and how long each
step took; each step lives in its own module: ``build`` (models and the ONNX export),
``precheck`` (latency and size before fine-tuning, rejecting over-budget candidates cheaply:
design rule 4), ``constraints`` (budgets and rejections), ``finetune`` (recovery and QAT + KD
with early stopping) and ``measurement`` (every recorded figure measured on the exported
ONNX file that becomes the trial's artifact: design rule 1). What every trial shares is the
``SearchContext`` (``context``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.study import TrialPruned
from autocompress.study import attrs as trial_attrs
from autocompress.train import tuning
from autocompress.transform.student import build_student, removes_weights
from autocompress.trial import build, constraints
from autocompress.trial import precheck as prechecks
from autocompress.trial.context import Precheck, SearchContext, precheck_key
from autocompress.trial.finetune import finetune
from autocompress.trial.measurement import measure_trial


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


class TrialRunner:
    """Callable objective for ``study.optimize``: returns the objective values."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    def __call__(self, trial: Any) -> tuple[float, ...]:
        ctx = self.ctx
        timer = _Timer()
        baseline = trial.user_attrs.get(trial_attrs.BASELINE)
        plan = space.suggest_plan(trial, ctx.inventory, ctx.space)
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

    def precheck(
        self, student: nn.Module, plan: CompressionPlan, baseline: str | None, out_dir: Path,
        *, careful: bool = False,
    ) -> Precheck:
        """Size and latency of the structure, cached by structure (``precheck.precheck``)."""
        return prechecks.precheck(self.ctx, student, plan, baseline, out_dir, careful=careful)

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
            student = build_student(ctx.task, plan, ctx.training.round_to)
        # A trial queued with its own step count (a promotion, a refine, evaluate_plan) was
        # asked for by name: measured even over budget, fine-tuned to the end.
        retrain = trial_attrs.FINETUNE_STEPS in trial.user_attrs
        pre = self._checked(trial, student, plan, baseline, timer, out_dir, retrain=retrain)

        if baseline is None and removes_weights(plan):
            with timer.phase("build"):  # within budget: now worth re-estimating BN statistics
                student = build_student(  # unfolded when a recovery phase trains through BN
                    ctx.task, plan, ctx.training.round_to,
                    bn_batches=build.bn_batches(ctx, trial.number),
                    fold=not tuning.recovers(plan))

        qat: nn.Module | None = None
        # A PTQ plan has no fine-tune: ONNX Runtime calibrates the float student at export.
        if baseline is None and plan.finetune_steps > 0 and not plan.is_ptq:
            with timer.phase("finetune"):
                student, qat, stopped = finetune(ctx, trial, student, plan,
                                                 early_stop=not retrain)
            if stopped:
                constraints.set_constraints(trial, ctx.budgets, pre.estimate_ms, pre.size_bytes)
                trial.set_user_attr(trial_attrs.EARLY_STOPPED, stopped)
                raise TrialPruned(stopped)

        with timer.phase("export"):
            if baseline is None and qat is None and not plan.is_ptq:  # zero fine-tune steps
                qat = build.untrained_qat(ctx, student, plan)
            artifact = build.export_candidate(ctx, student, qat, plan, baseline, out_dir)
            # The PyTorch side of the candidate (fine-tuned weights) for `export`/`rebuild`.
            torch_state = out_dir / "student.pt"
            torch.save((qat if qat is not None else student).state_dict(), torch_state)

        with timer.phase("measure"):
            values = measure_trial(ctx, trial, artifact, student, plan, pre,
                                   precheck_key(plan, baseline))
            trial.set_user_attr(trial_attrs.TORCH_KIND, "float" if qat is None else "qat")
            trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_SHA256, measure.sha256_file(torch_state))
            trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_ID, ctx.upload(trial, torch_state))
        return values

    def _checked(
        self, trial: Any, student: nn.Module, plan: CompressionPlan, baseline: str | None,
        timer: _Timer, out_dir: Path, *, retrain: bool,
    ) -> Precheck:
        """The pre-check (skipped when the latency model predicts the structure far over
        budget); an over-budget plan is recorded as rejected (TrialPruned) unless it is a
        baseline or a retrain."""
        ctx = self.ctx
        with timer.phase("precheck"):
            predicted = prechecks.predict_ratio(ctx, trial, student, plan, baseline)
            if ctx.latency_model.should_skip(predicted, ctx.budget_ratio()):
                constraints.reject_predicted(ctx, trial, predicted)
            pre = self.precheck(student, plan, baseline, out_dir)
            if predicted is not None:
                ctx.latency_model.record_check(predicted, pre.ratio)
        broken = constraints.broken_budgets(ctx.budgets, pre.estimate_ms, pre.size_bytes)
        if broken and baseline is None and not retrain:
            constraints.reject(ctx, trial, pre, broken)
        # Baselines cost no fine-tune: they are measured even over budget (recorded as
        # infeasible), so the study always knows the teacher's and plain PTQ's accuracy.
        # So is a retrain of a plan measured within budget: a noisy pre-check must not throw
        # away the long fine-tune someone asked for.
        trial.set_user_attr(trial_attrs.PRECHECK_LATENCY_ESTIMATE, pre.estimate_ms)
        return pre
