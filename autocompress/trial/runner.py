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
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.errors import AutocompressError, StudyError
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.study import TrialPruned
from autocompress.study import attrs as trial_attrs
from autocompress.train import tuning
from autocompress.train.losses import TaskLossError
from autocompress.transform.student import build_student, removes_weights
from autocompress.trial import build, constraints, lineage
from autocompress.trial import precheck as prechecks
from autocompress.trial.context import Precheck, SearchContext, precheck_key
from autocompress.trial.finetune import finetune_trial
from autocompress.trial.lineage import Lineage, Trained
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


class _QuietFatal(logging.Filter):
    """Drops Optuna's two "trial failed" warnings (the first with a traceback) for a
    TaskLossError: the run ends on it with its own one line (search.loop), and a screenful
    pointing into the task's code is noise."""

    def __init__(self) -> None:
        super().__init__()
        self._value_line_next = False  # Optuna's "failed with value None." follows

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TaskLossError):
            self._value_line_next = True
            return False
        if self._value_line_next:
            self._value_line_next = False
            return "failed with value" not in record.getMessage()
        return True


# The logger Optuna's optimize loop reports failed trials on.
logging.getLogger("optuna.study._optimize").addFilter(_QuietFatal())

# The weight width each baseline's plan is uniform at (what the search's BASELINES queue).
BASELINE_BITS: dict[str, int] = {"fp32": 32, "int8-ptq": 8, "int8-dynamic": 8}
# calibration batches an inherited child's channel statistics are restored on (lineage)
RENORMALIZE_BATCHES = 4


class PrefixedTrial:
    """An Optuna trial whose suggested parameter names carry ``prefix``: a student's plan
    space beside the teacher's in one study (``space.suggest_plan`` asks it)."""

    def __init__(self, trial: Any, prefix: str) -> None:
        self._trial, self._prefix = trial, prefix

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._trial.suggest_categorical(self._prefix + name, choices)

    def suggest_float(self, name: str, low: float, high: float, **kwargs: Any) -> float:
        return self._trial.suggest_float(self._prefix + name, low, high, **kwargs)


class TrialRunner:
    """Callable objective for ``study.optimize``: returns the objective values."""

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        # An error every further trial would meet too (the task's own loss is broken): the
        # search ends on it after the trial that met it is recorded (``search.loop``).
        self.fatal: AutocompressError | None = None
        # fine-tuned trials' weights, for the trials that inherit from them
        self.lineage = Lineage()
        # a PTQ calibration method: search trials are realised by it instead of fine-tuned
        # (search/fidelity.py); promotions, refines and baselines keep their own realisation
        self.calibration_only: str | None = None
        # --student (search/students.py): the base model this runner compresses (None: the
        # teacher), the prefix of its Optuna parameter names (a student's layer names must
        # not share the teacher's parameters), and the objectives of the other bases' trials
        # (a trial queued with user attribute BASE_MODEL is run by the runner of that base)
        self.base: str | None = None
        self.param_prefix = ""
        self.bases: dict[str, Callable[[Any], tuple[float, ...]]] = {}

    def first_fatal(self) -> AutocompressError | None:
        """The error that ends the search: this runner's ``fatal``, else that of another
        base's runner (a ``--student``'s trials meet their own, and would all meet it)."""
        if self.fatal is not None:
            return self.fatal
        for objective in self.bases.values():
            inner = getattr(objective, "runner", None)  # students.StudentBase.runner
            if isinstance(inner, TrialRunner) and inner.first_fatal() is not None:
                return inner.first_fatal()
        return None

    def __call__(self, trial: Any) -> tuple[float, ...]:
        base = trial.user_attrs.get(trial_attrs.BASE_MODEL)
        if base not in (None, trial_attrs.TEACHER_BASE, self.base):
            return self._other_base(trial, str(base))
        ctx = self.ctx
        timer = _Timer()
        baseline = trial.user_attrs.get(trial_attrs.BASELINE)
        plan = self._plan(trial, baseline)
        steps = trial.user_attrs.get(trial_attrs.FINETUNE_STEPS)
        if steps is not None:  # a promotion or a refine: the parent's plan, trained longer
            plan = dataclasses.replace(plan, finetune_steps=int(steps))
        elif self.calibration_only and baseline is None and not plan.is_ptq:
            plan = dataclasses.replace(plan, realisation="ptq", calibration=self.calibration_only)
        trial.set_user_attr(trial_attrs.FIDELITY, "baseline" if baseline is not None else
                            "calibration" if plan.is_ptq else "fine-tune")
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
            if isinstance(exc, TaskLossError):
                self.fatal = TaskLossError(
                    f"{exc} (trial {trial.number} failed on it and the run stopped: every "
                    "trial would; the trials that finished are kept)")
            raise
        except Exception as exc:
            trial.set_user_attr(trial_attrs.FAIL_REASON, f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            trial.set_user_attr(trial_attrs.TIMING, json.dumps(timer.seconds))

    def _other_base(self, trial: Any, base: str) -> tuple[float, ...]:
        """A trial of another base model (a ``--student``): run by that base's objective."""
        objective = self.bases.get(base)
        if objective is None:
            reason = (f"trial {trial.number} compresses student {base!r}, which this worker "
                      f"has not loaded; run the search with --student {base}")
            trial.set_user_attr(trial_attrs.FAIL_REASON, reason)
            raise StudyError(reason)
        return objective(trial)

    def _plan(self, trial: Any, baseline: str | None) -> CompressionPlan:
        """The trial's plan, asked of the sampler; a baseline at a width the search does not
        try (--bits 8,4: the fp32 file every figure is compared with) is queued at the widest
        width searched, as the sampler's choices allow, and made at its own width here."""
        ctx = self.ctx
        asked = PrefixedTrial(trial, self.param_prefix) if self.param_prefix else trial
        plan = space.suggest_plan(asked, ctx.inventory, ctx.space)
        bits = BASELINE_BITS.get(baseline or "")
        if bits is not None and bits not in ctx.space.bits:
            plan = dataclasses.replace(plan, bits=dict.fromkeys(plan.bits, bits))
        return plan

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

        parent = self._parent(trial, plan, baseline)
        student = self._starting_student(trial, plan, baseline, parent, student, timer)

        qat: nn.Module | None = None
        # A PTQ plan has no fine-tune: ONNX Runtime calibrates the float student at export.
        if baseline is None and plan.finetune_steps > 0 and not plan.is_ptq:
            start = 0 if parent is None else parent.steps
            with timer.phase("finetune"):
                student, qat, stopped = finetune_trial(ctx, trial, student, plan,
                                                       early_stop=not retrain, start=start)
            if stopped:
                constraints.set_constraints(trial, ctx.budgets, pre.estimate_ms, pre.size_bytes)
                trial.set_user_attr(trial_attrs.EARLY_STOPPED, stopped)
                raise TrialPruned(stopped)
            steps = start + int(trial.user_attrs.get(trial_attrs.FINETUNE_STEPS_RUN, 0))
            trial.set_user_attr(trial_attrs.LINEAGE_STEPS, steps)
            self.lineage.add(trial.number, plan, qat, steps)

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
        self.lineage.measured(trial.number, trial.user_attrs.get(trial_attrs.ACCURACY))
        return values

    def _parent(self, trial: Any, plan: CompressionPlan, baseline: str | None) -> Trained | None:
        """The fine-tuned trial this one starts from (``lineage``), or None: the teacher.
        Preferred: the trial a proposal was derived from, or the one a retrain trains on."""
        if baseline is not None or trial.user_attrs.get(trial_attrs.REFINE_START) == "teacher":
            return None  # search.refine.refine_start says why
        preferred = trial.user_attrs.get(trial_attrs.PROPOSED_FROM,
                                         trial.user_attrs.get(trial_attrs.PARENT))
        if preferred is not None and self.lineage.get(int(preferred)) is None:
            # another process's trial (a refine, a resumed study, another worker): its
            # trained weights come from the artifact store
            lineage.load_stored(self.lineage, trial.study, int(preferred), self.ctx,
                                base=self.base)
        return self.lineage.parent_for(
            plan, preferred=None if preferred is None else int(preferred),
            floor=self.ctx.fp32_accuracy - self.ctx.training.early_stop_drop)

    def _starting_student(
        self, trial: Any, plan: CompressionPlan, baseline: str | None, parent: Trained | None,
        student: nn.Module, timer: _Timer,
    ) -> nn.Module:
        """The student the fine-tune starts from: the parent's trained weights on the plan's
        structure (folded: they were trained folded), else the teacher's with BatchNorm
        statistics re-estimated when the plan removes weights."""
        ctx = self.ctx
        if parent is not None:
            with timer.phase("inherit"):
                share = self.lineage.inherit(student, plan, parent, ctx.task,
                                             ctx.training.round_to,
                                             ctx.calibration[:RENORMALIZE_BATCHES])
            trial.set_user_attr(trial_attrs.INHERITED_FROM, parent.number)
            trial.set_user_attr(trial_attrs.INHERITED_SHARE, round(share, 4))
            return student
        if baseline is None and removes_weights(plan):
            with timer.phase("build"):  # within budget: now worth re-estimating BN statistics
                return build_student(  # unfolded when a recovery phase trains through BN
                    ctx.task, plan, ctx.training.round_to,
                    bn_batches=build.bn_batches(ctx, trial.number),
                    fold=not tuning.recovers(plan))
        return student

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
