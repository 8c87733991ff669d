"""``--student SPEC``: a different architecture distilled from the teacher, then compressed.

Once per study and student, before the warm starts, the student (any model spec the
product reads, built from its own initialisation) is distilled from the teacher for whole
epochs (``train/student_distill.py``: logit KD, plus feature KD on the layers that pair up
by resolution). That distillation is a trial of its own, linked to the teacher
(``student_of``), with its epochs, recipe and layer pairing recorded: its file is the
student's fp32 ONNX, measured like any trial (against the teacher's fp32 reference:
budgets, latency ratios and the study's figures stay the teacher's), so the front shows it.
Its weights are stored in the artifact store (``student_weights_id``): a later run, another
worker, ``refine`` and ``export`` rebuild the student from them, never distil it again.
Workers starting on a new study at once distil it once: under the study lock, the others
wait for its record (``student_claim``).

The search then compresses the student as a second base model. A student trial records
``base_model`` (the spec); its plan is keyed by the student's layer names and its Optuna
parameters carry the prefix ``student[SPEC]/`` so they never mix with the teacher's. It is
run by a ``TrialRunner`` of its own (registered in the teacher runner's ``bases``) whose
context holds the distilled student in place of the teacher: plans are built from it, KD
and feature KD distil from it (the student's own fp32 form, not the original teacher), and
its early-stop floor is the student's own validation accuracy.

What a student gets: uniform int8 and int4 QAT + KD warm starts, a share of the search
trials (round robin with the teacher's proposals: one turn each), sampled by the study's
sampler in the student's prefixed space, and promotions, refine and export like any
trial. What it does not get (first version): no sensitivity pass, guided plans or front
proposals (the front proposer models the teacher's space and sees the teacher's trials
only), no latency-model skip (its own model starts unfitted), and no inheritance across
bases.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress import intake
from autocompress import study as study_mod
from autocompress.config.settings import SearchSettings, SpaceSettings
from autocompress.errors import InputError, StudyError, one_line
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import measure, timing
from autocompress.runtime.latency_model import LatencyModel
from autocompress.search import student_claim
from autocompress.search.session import Session, _say
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord
from autocompress.train.student_distill import StudentRecipe, StudentResult, distil_student
from autocompress.transform import quantize
from autocompress.transform.student import build_student
from autocompress.transform.survey import build_inventory
from autocompress.trial import build
from autocompress.trial.context import Precheck, SearchContext
from autocompress.trial.measurement import measure_trial
from autocompress.trial.runner import TrialRunner

# Of the time left when the students are distilled (under --time-limit), the share their
# distillation may use, split evenly between the students still to distil.
TIME_SHARE = 0.3
# the first latency look of the student's fp32 file (the measurement then times it carefully)
_LOOK_ROUNDS, _LOOK_REPEATS = 1, 5


def param_prefix(spec: str) -> str:
    """The prefix of a student's Optuna parameter names."""
    return f"student[{spec}]/"


def check_specs(specs: tuple[str, ...], num_classes: int | None) -> None:
    """Build each student once, before the study opens: a spec that names nothing is one
    InputError line (exit 2) before the teacher is even loaded (``load_models`` then checks
    it against the task's input and classes)."""
    for spec in dict.fromkeys(s.strip() for s in specs):
        _built(spec, lambda spec=spec: intake.load_model(spec, None, num_classes=num_classes))


def _built(spec: str, build: Callable[[], nn.Module]) -> nn.Module:
    try:
        return build()
    except InputError as exc:
        raise InputError(f"--student {spec!r}: {exc}") from None
    except Exception as exc:  # a factory that raises: the user's code, one line
        raise InputError(f"--student {spec!r} could not be built: "
                         f"{one_line(exc, typed=True)}") from None


def load_models(specs: tuple[str, ...], task: intake.Task) -> dict[str, nn.Module]:
    """The students' untrained models, checked against the task's input and classes; a
    bad spec is one InputError line (exit 2) before anything is trained."""
    models: dict[str, nn.Module] = {}
    for spec in dict.fromkeys(s.strip() for s in specs):

        def build(spec: str = spec) -> nn.Module:
            model = intake.load_model(spec, None, num_classes=task.num_classes,
                                      input_shape=task.input_shape)
            intake.check_model_input(model, task.data.example_input(2), spec)
            return model

        models[spec] = _built(spec, build)
    return models


class StudentBase:
    """One student: its distillation trial's objective, then the runner that compresses it
    (``TrialRunner.bases[spec]`` is this object)."""

    def __init__(self, spec: str, model: nn.Module, teacher: TrialRunner,
                 recipe: StudentRecipe) -> None:
        self.spec = spec
        self.model = model
        self.teacher = teacher
        self.recipe = recipe
        self.runner: TrialRunner | None = None
        self.trial: int | None = None  # its distillation trial
        self.allowed_s: float | None = None  # distillation seconds (time limit), None: any
        self.on_start: Callable[[str], None] | None = None

    def __call__(self, trial: Any) -> tuple[float, ...]:
        if trial.user_attrs.get(trial_attrs.STUDENT_DISTILLED) is not None:
            done = student_claim.measured(trial.study, self.spec)
            if done is not None:  # a queued copy (a dead worker's retry): never distil twice
                reason = f"student {self.spec!r} was distilled in trial {done.number} already"
                trial.set_user_attr(trial_attrs.FAIL_REASON, reason)
                raise StudyError(reason)
            return self._distil(trial)
        if self.runner is None:
            reason = f"student {self.spec!r} is not distilled yet in this worker"
            trial.set_user_attr(trial_attrs.FAIL_REASON, reason)
            raise StudyError(reason)
        return self.runner(trial)

    # -- the runner that compresses the distilled student -------------------------------

    def context(self, accuracy: float) -> SearchContext:
        """The teacher's context with the distilled student as the model to compress; the
        fp32 file timed against, the reference and the budgets stay the teacher's."""
        tctx = self.teacher.ctx
        task = dataclasses.replace(tctx.task, model=self.model.eval(), model_spec=self.spec,
                                   weights=None)
        inventory = build_inventory(self.model, task.data.example_input(1))
        # --feature-layers names the teacher's layers: the student uses its stage outputs
        settings = dataclasses.replace(tctx.space, feature_layers=())
        space.check_space(inventory, settings)
        return dataclasses.replace(
            tctx, task=task, inventory=inventory, space=settings, fp32_accuracy=accuracy,
            teacher_cache=None, precheck_cache={}, structure_ratios={},
            latency_model=LatencyModel())

    def use(self, accuracy: float) -> None:
        runner = TrialRunner(self.context(accuracy))
        runner.base = self.spec
        runner.param_prefix = param_prefix(self.spec)
        runner.calibration_only = self.teacher.calibration_only
        self.runner = runner

    def load(self, record: TrialRecord) -> None:
        """The student as its distillation trial left it (weights from the artifact store)."""
        ctx = self.teacher.ctx
        artifact = record.attrs.get(trial_attrs.STUDENT_WEIGHTS_ID)
        if artifact is None or ctx.download is None:
            raise StudyError(f"student {self.spec!r}: trial {record.number} stored no weights")
        dest = ctx.workdir / f"student-{record.number}.pt"
        ctx.download(str(artifact), dest)
        state = torch.load(str(dest), map_location="cpu", weights_only=True)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # the student's code changed since it was distilled
            raise StudyError(
                f"student {self.spec!r}: the weights distilled in trial {record.number} do not "
                f"fit the model it builds now ({one_line(exc, whole=True, limit=160)}); run "
                "with the student's code as it was then, or start a new study (--study "
                "NEW_NAME)") from None
        self.model.eval()
        self.trial = record.number
        self.use(float(record.accuracy or 0.0))

    # -- the distillation trial -----------------------------------------------------------

    def _distil(self, trial: Any) -> tuple[float, ...]:
        tctx = self.teacher.ctx
        trial.set_user_attr(trial_attrs.FIDELITY, "distillation")
        trial.set_user_attr(trial_attrs.STUDENT_OF, trial_attrs.TEACHER_BASE)
        trial.set_user_attr(trial_attrs.STUDENT_RECIPE, json.dumps(self.recipe.to_dict()))
        started = time.perf_counter()

        def keep_going(done: int, per_epoch: float) -> bool:
            spent = time.perf_counter() - started
            return self.allowed_s is None or spent + per_epoch <= self.allowed_s

        def on_epoch(done: int, planned: int, loss: float, seconds: float) -> None:
            _say(f"student {self.spec}: epoch {done}/{planned}, KD loss {loss:.4f}, "
                 f"{seconds:.1f} s", self.on_start)

        try:
            result = distil_student(self.model, tctx.task.model, tctx.task.data, self.recipe,
                                    device=tctx.device, hard_loss=tctx.task.loss,
                                    keep_going=keep_going, on_epoch=on_epoch)
            self._record_result(trial, result)
            return self._measure(trial, result)
        except Exception as exc:
            trial.set_user_attr(trial_attrs.FAIL_REASON, one_line(exc, typed=True)[:500])
            raise

    def _record_result(self, trial: Any, result: StudentResult) -> None:
        trial.set_user_attr(trial_attrs.STUDENT_EPOCHS, result.epochs_run)
        trial.set_user_attr(trial_attrs.STUDENT_PAIRING, json.dumps(result.pairing))
        recipe = {**self.recipe.to_dict(), **result.to_dict()}
        trial.set_user_attr(trial_attrs.STUDENT_RECIPE, json.dumps(recipe))

    def _measure(self, trial: Any, result: StudentResult) -> tuple[float, ...]:
        """The distilled student's fp32 file, measured like any trial; its weights stored."""
        tctx = self.teacher.ctx
        sctx = self.context(tctx.fp32_accuracy)
        plan = dataclasses.replace(space.uniform_plan(sctx.inventory, sctx.space, bits=32,
                                                      activation_bits=space.WEIGHT_ONLY),
                                   finetune_steps=0)
        trial.set_user_attr(trial_attrs.PLAN, plan.to_json())
        trial.set_user_attr(trial_attrs.PLAN_SUMMARY, f"student {self.spec}: fp32, distilled "
                                                      f"{result.epochs_run} epoch(s)")
        trial.set_user_attr(trial_attrs.STUDENT_INVENTORY, json.dumps(sctx.inventory.to_dict()))
        out = tctx.workdir / f"trial-{trial.number}"
        out.mkdir(parents=True, exist_ok=True)
        # the float structure every student trial is rebuilt from (BN folded, as export does)
        folded = build_student(sctx.task, plan, tctx.training.round_to)
        artifact = quantize.export_float_onnx(folded, sctx.task.data.example_input(1),
                                              out / "model.onnx")
        if sctx.measurement.target == executorch_runtime.TARGET:  # the file that is measured
            build.write_program(sctx, folded, None, plan, None, artifact, sctx.calibration)
        values = measure_trial(sctx, trial, artifact, folded, plan, _look(sctx, artifact),
                               f"student-fp32:{self.spec}")
        _store(sctx, trial, folded, out / "student.pt")
        weights = out / "distilled.pt"
        torch.save(self.model.state_dict(), weights)
        trial.set_user_attr(trial_attrs.STUDENT_WEIGHTS_ID, sctx.upload(trial, weights))
        self.trial = trial.number
        self.use(float(trial.user_attrs[trial_attrs.ACCURACY]))
        return values


def _look(ctx: SearchContext, artifact: Path) -> Precheck:
    """A first latency look of the student's fp32 file against the teacher's (what the
    pre-check gives a trial; the measurement that follows is the careful one)."""
    m = ctx.measurement
    inter = timing.time_interleaved(artifact, ctx.fp32_onnx, ctx.latency_shape,
                                    threads=m.threads, candidate_options={},
                                    reference_options={}, rounds=_LOOK_ROUNDS,
                                    repeats=_LOOK_REPEATS, target=m.target)
    return Precheck(latency=inter.candidate, reference=inter.reference, ratio=inter.ratio,
                    size_bytes=measure.file_size(artifact), session_options={},
                    estimate_ms=ctx.budget_latency_ms(inter))


def _store(ctx: SearchContext, trial: Any, model: nn.Module, path: Path) -> None:
    """The trial's PyTorch side (what export and rebuild load), as every trial stores it."""
    torch.save(model.state_dict(), path)
    trial.set_user_attr(trial_attrs.TORCH_KIND, "float")
    trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_SHA256, measure.sha256_file(path))
    trial.set_user_attr(trial_attrs.TORCH_ARTIFACT_ID, ctx.upload(trial, path))


def distilled_records(records: list[TrialRecord]) -> dict[str, TrialRecord]:
    """Spec -> the study's measured distillation trial of that student (the first, as
    ``student_claim.measured``: the one the student's trials are compressed from)."""
    out: dict[str, TrialRecord] = {}
    for r in records:
        spec = r.attrs.get(trial_attrs.STUDENT_DISTILLED)
        if spec is not None and r.measured:
            out.setdefault(str(spec), r)
    return out


def prepare(session: Session, settings: SearchSettings, models: dict[str, nn.Module],
            elapsed: float, on_start: Callable[[str], None] | None) -> list[StudentBase]:
    """Every student of this run and of the study ready to compress: distilled now (once
    per study) or loaded from its distillation trial; registered on the session's runner."""
    study, runner = session.study, session.runner
    recorded = distilled_records(study_mod.records(study))
    for spec in recorded:
        if spec not in models:  # a student of an earlier run: its trials may be queued
            try:
                models.update(load_models((spec,), session.task))
            except InputError as exc:
                _say(f"{exc}; its queued trials will fail", on_start)
    recipe = StudentRecipe(epochs=settings.run.student_epochs,
                           batch_size=settings.training.batch_size, seed=settings.training.seed)
    bases = [StudentBase(spec, model, runner, recipe) for spec, model in models.items()]
    for base in bases:
        base.on_start = on_start
        runner.bases[base.spec] = base
    fresh = [b for b in bases if b.spec not in recorded]
    for base in bases:
        if base.spec in recorded:
            base.load(recorded[base.spec])
            r = recorded[base.spec]
            _say(f"student {base.spec}: distilled in trial {r.number} "
                 f"({r.attrs.get(trial_attrs.STUDENT_EPOCHS)} epoch(s)), val "
                 f"{r.accuracy:.4f}; not distilled again", on_start)
    limit = settings.run.time_limit
    for base in fresh:
        wait_s = student_claim.WAIT_S
        if limit is not None:
            left = max(limit * 60 - elapsed, 0.0)
            base.allowed_s = TIME_SHARE * left / len(fresh)
            wait_s = max(left, student_claim.POLL_S)  # another worker's, within the limit
        _distil_once(session, base, on_start, wait_s)
    return [b for b in bases if b.runner is not None]


def _distil_once(session: Session, base: StudentBase,
                 on_start: Callable[[str], None] | None, wait_s: float) -> None:
    """The student's distillation trial, queued first and run now, under the study's lock
    (``student_claim``); distilled by another worker meanwhile: its weights loaded."""
    study = session.study

    def distil() -> None:
        study_mod.enqueue(study, {}, {trial_attrs.BASE_MODEL: base.spec,
                                      trial_attrs.STUDENT_DISTILLED: base.spec}, first=True)
        _say(f"student {base.spec}: distilling from the teacher for up to "
             f"{base.recipe.epochs} epoch(s)", on_start)
        study.optimize(session.runner, n_trials=1, catch=(Exception,))

    record = student_claim.distil_or_wait(study, base.spec, distil, wait_s=wait_s,
                                          on_wait=lambda note: _say(note, on_start))
    if base.trial != record.number:  # another worker's distillation (or an earlier one)
        base.load(record)
    teacher = session.runner.ctx.fp32_accuracy
    pairs = json.loads(record.attrs.get(trial_attrs.STUDENT_PAIRING) or "[]")
    _say(f"student {base.spec} distilled as trial {record.number}: "
         f"{record.attrs.get(trial_attrs.STUDENT_EPOCHS)} epoch(s), val "
         f"{record.accuracy:.4f} (teacher {teacher:.4f}), {(record.size_bytes or 0) / 1e3:.1f} "
         f"KB, feature pairs {', '.join(f'{s}~{t}' for s, t in pairs) or 'none'}", on_start)


def student_params(base: StudentBase, plan: CompressionPlan) -> dict[str, Any]:
    """The Optuna params (prefixed) that make the student's runner build ``plan``."""
    if base.runner is None:
        raise StudyError(f"student {base.spec!r} is not distilled yet; nothing to queue")
    ctx = base.runner.ctx
    params = space.plan_to_params(plan, ctx.inventory, ctx.space)
    return {param_prefix(base.spec) + k: v for k, v in params.items()}


def enqueue_starts(study: Any, bases: list[StudentBase], settings: SpaceSettings,
                   runner: TrialRunner) -> int:
    """Each student's uniform int8 and int4 QAT + KD plans, once per study; returns how
    many this worker queued."""
    if runner.calibration_only is not None:
        return 0
    named = []
    for base in bases:
        if base.runner is None:
            continue
        for bits in (b for b in (8, 4) if b in settings.bits):
            plan = space.uniform_plan(base.runner.ctx.inventory, base.runner.ctx.space,
                                      bits=bits)
            named.append((f"{base.spec}:uniform-int{bits}", base, plan))
    with study_mod.study_lock(study):
        have = {t.user_attrs.get(trial_attrs.STUDENT_START)
                for t in study.get_trials(deepcopy=False)}
        missing = [item for item in named if item[0] not in have]
        for name, base, plan in missing:
            study_mod.enqueue(study, student_params(base, plan), {
                trial_attrs.BASE_MODEL: base.spec, trial_attrs.STUDENT_START: name})
    return len(missing)


def retrain_params(record: TrialRecord, runner: TrialRunner, plan: CompressionPlan,
                   settings: SpaceSettings) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(params, extra attrs) that queue a retrain of ``record``'s ``plan`` (a promotion, a
    refine) on the base it compresses; None when that student is not loaded here."""
    spec = record.base_model
    if spec is None:
        return space.plan_to_params(plan, runner.ctx.inventory, settings), {}
    base = runner.bases.get(spec)
    if not isinstance(base, StudentBase) or base.runner is None:
        return None
    return student_params(base, plan), {trial_attrs.BASE_MODEL: spec}


__all__ = ["StudentBase", "check_specs", "distilled_records", "enqueue_starts", "load_models",
           "param_prefix", "prepare", "retrain_params", "student_params"]
