"""The final repair: one chosen plan fine-tuned for whole epochs, recorded as a new trial.

``autocompress refine --study S --trial N --epochs E`` (and ``export --refine-epochs E``)
retrains trial N's plan for E epochs of the training split (cosine decay over the whole run,
no early stop), through the same trial runner as the search, from the teacher or from trial
N's trained weights (``refine_start``); the result is a new trial with ``parent_trial = N``,
its own exported file and every figure measured on it. The front then shows the refined
trial in place of its parent (``pareto.most_trained``). HAQ, AMC and NetAdapt do the same:
search with short fine-tunes, then fine-tune the chosen network for long.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress import study as study_mod
from autocompress.config.files import config_from_stored
from autocompress.config.settings import SearchSettings
from autocompress.errors import InputError, StudyError
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord

if TYPE_CHECKING:
    from autocompress.export import ExportResult
    from autocompress.search.session import Session
    from autocompress.trial.runner import TrialRunner

MAX_EPOCHS = 1000


class RefineError(InputError):
    """A trial that cannot be refined, or a refine that did not finish."""


def refinable(records: Sequence[TrialRecord], number: int, study_name: str) -> TrialRecord:
    """The record of trial ``number`` when it can be refined; RefineError saying why not."""
    record = next((r for r in records if r.number == number), None)
    if record is None:
        raise RefineError(f"study {study_name!r} has no trial {number}; see `autocompress show "
                          f"--study {study_name} --all`")
    if record.baseline == "fp32":
        raise RefineError(f"trial {number} is the fp32 baseline: there is nothing to repair; "
                          "pick a compressed trial from `autocompress show`")
    if record.attrs.get(trial_attrs.STUDENT_DISTILLED) is not None:
        raise RefineError(f"trial {number} is the distillation of student "
                          f"{record.attrs[trial_attrs.STUDENT_DISTILLED]!r} (its fp32 form): "
                          "rerun the search with more --student-epochs, or refine one of its "
                          "compressed trials")
    if not record.measured:
        why = record.rejected or record.fail_reason or f"state {record.state}"
        raise RefineError(f"trial {number} has no measured result to refine ({why}); pick a "
                          "completed trial from `autocompress show`")
    return record


def refine_start(plan: CompressionPlan, steps: int, parent: TrialRecord) -> str:
    """Where a refine of ``parent``'s plan for ``steps`` steps starts: "teacher" or "parent".

    From the teacher when the plan prunes and the refine trains at least as long as the
    parent's whole lineage did: its first 3/4 then run with BatchNorm live at the recovery
    rate (``train.tuning``), which the parent's BatchNorm-folded weights cannot have, and the
    head start those weights give is worth less than that phase over so many steps. Measured
    on ResNet-20 / CIFAR-10 (the shared teacher, fp32 test 0.8613), 2-epoch (1,408-step)
    refines of two int4 plans the search had trained along a lineage of 450 and 600 steps,
    test accuracy:

        plan                  parent   on from it   on from it, BN re-inserted   teacher
        13.2x, prune ~0.48x5  0.8132     0.8428              0.8472              0.8498
        12.5x, prune ~0.45x5  0.8256       -                 0.8502              0.8522

    (BatchNorm re-inserted into the folded parent as an identity, then trained as the
    teacher-started student is; a random crop-and-flip augmentation of the refine's batches
    gave 0.8439 and 0.8499 for the 13.2x plan on from it and from the teacher: no gain). A
    short refine keeps the head start: the digits demo's 51-step refine of a plan trained for
    900 steps came out 0.9972 test from the parent, 0.9916 from the teacher. A plan that does
    not prune has no recovery phase, so it always trains on from the parent.
    """
    from autocompress.train import tuning  # torch: refining only

    lineage = int(parent.attrs.get(trial_attrs.LINEAGE_STEPS)
                  or parent.plan.get("finetune_steps") or 0)
    # the teacher start pays only where the refine gets the recovery phase
    recovers = tuning.recovers(dataclasses.replace(plan, finetune_steps=steps))
    return "teacher" if recovers and steps >= lineage else "parent"


def steps_for(epochs: int, train_images: int, batch_size: int) -> int:
    """Fine-tune steps in ``epochs`` passes over the training split."""
    return epochs * max(1, math.ceil(train_images / batch_size))


def refine_trial(
    storage_url: str,
    study_name: str,
    trial: int,
    epochs: int,
    *,
    artifacts_dir: str | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    learning_rate: float | None = None,
) -> TrialRecord:
    """Retrain trial ``trial``'s plan for ``epochs`` epochs as a new trial; returns its record.

    The study's search settings are reused (model, data, batch size, latency conditions, and
    the learning rate unless ``learning_rate`` is given: the study's was probed for its short
    fine-tunes); the new trial is measured like any other, and its file uploaded.
    """
    if not 1 <= epochs <= MAX_EPOCHS:
        raise RefineError(f"--epochs {epochs} must be between 1 and {MAX_EPOCHS} (e.g. 5)")
    if learning_rate is not None and not 0 < learning_rate <= 1:
        raise RefineError(f"--learning-rate {learning_rate:g} must be in (0, 1] (e.g. 1e-3)")
    from autocompress.search import session as sessions  # torch: refining only
    from autocompress.search import students

    storage = study_mod.open_storage(storage_url, create=False)
    with study_mod.single_sqlite_worker(storage_url):
        study = study_mod.load_existing_study(storage_url, study_name)
        info = study_mod.study_info(study, storage_url)
        parent = refinable(study_mod.records(study), trial, study_name)
        stored = info.json_attr("config")
        if not isinstance(stored, dict):
            raise StudyError(f"study {study_name!r} records no search config (made by an older "
                             "version?); run `autocompress search` on it once, then refine")
        config = config_from_stored(
            stored, study=study_name, storage=storage_url, time_limit=None,
            artifacts=artifacts_dir or info.attrs.get("artifacts_dir"),
        )
        with tempfile.TemporaryDirectory(prefix="autocompress-refine-") as tmp, \
                sessions.torch_threads(config.fine_tune_threads()):
            session = sessions.open_session(config, storage_url, storage, Path(tmp), on_note)
            settings = sessions.use_learning_rate(session, on_note, learning_rate)
            # the study's students (--student), so a student's trial is retrained on its base
            for base in students.prepare(session, settings, {}, 0.0, on_note):
                if base.runner is not None:
                    base.runner.ctx.on_step = on_step
            marker = _enqueue_refine(session, settings, parent, epochs, on_note)
            session.runner.ctx.on_step = on_step
            session.study.optimize(session.runner, n_trials=1, catch=(Exception,))
        records = study_mod.records(session.study)
    mine = [r for r in records if r.attrs.get(trial_attrs.REFINE_REQUEST) == marker]
    if not mine:
        raise RefineError(f"the refine of trial {trial} was queued but another worker took it "
                          "up; see `autocompress show --all`")
    record = mine[-1]
    if not record.measured:
        why = record.fail_reason or record.rejected or record.state
        raise RefineError(f"the refine of trial {trial} (trial {record.number}) did not "
                          f"finish: {why}")
    return record


def enqueue_retrain(study: Any, runner: TrialRunner, settings: SearchSettings,
                    parent: TrialRecord, steps: int, attrs: dict[str, Any]) -> str | None:
    """Queue a retrain (a refine or a promotion) of ``parent``'s plan for ``steps`` steps first
    in the study, with ``attrs``, starting where ``refine_start`` says (recorded as
    ``refine_start``: at a promotion's length too, 704 steps of a 12.5x ResNet-20 plan gave
    0.8530 test from the teacher, 0.8433 on from its trial); returns that start, or None when
    ``parent`` compresses a student this worker could not load."""
    from autocompress.search.students import retrain_params  # torch

    plan = space.as_qat(CompressionPlan.from_dict(parent.plan))
    # keyed by the layer names of the base it compresses (the teacher or a --student)
    queued = retrain_params(parent, runner, plan, settings.space)
    if queued is None:
        return None
    begin = refine_start(plan, steps, parent)
    study_mod.enqueue(study, queued[0], {
        trial_attrs.PARENT: parent.number, trial_attrs.FINETUNE_STEPS: steps,
        trial_attrs.REFINE_START: begin, **attrs, **queued[1],
    }, first=True)
    return begin


def _enqueue_refine(
    session: Session, settings: SearchSettings, parent: TrialRecord, epochs: int,
    on_note: Callable[[str], None] | None,
) -> str:
    """Queue the retrain of ``parent``'s plan for ``epochs`` epochs first in the study;
    returns the marker that finds its trial."""
    train_images = len(session.task.data.split("train"))
    steps = steps_for(epochs, train_images, settings.training.batch_size)
    trial = parent.number
    marker = f"{trial}:{epochs}:{uuid.uuid4().hex[:12]}"  # finds this refine's trial
    begin = enqueue_retrain(session.study, session.runner, settings, parent, steps, {
        trial_attrs.REFINE_EPOCHS: epochs, trial_attrs.REFINE_REQUEST: marker})
    if begin is None:
        raise RefineError(f"trial {parent.number} compresses student {parent.base_model!r}, "
                          "which could not be loaded (see the note above)")
    if on_note:
        start = ("from the teacher, BatchNorm live for the first 3/4" if begin == "teacher"
                 else f"from trial {trial}'s weights")
        on_note(f"refining trial {trial} ({parent.plan_summary}): {epochs} epoch(s) = "
                f"{steps} steps of {settings.training.batch_size} images, learning rate "
                f"{settings.space.learning_rate:g}, cosine, {start}")
    return marker


def refine_and_export(
    storage_url: str,
    study_name: str,
    *,
    out: str | Path,
    epochs: int,
    trial: int | None = None,
    best: bool = False,
    budgets: Sequence[str] = (),
    max_accuracy_drop: str | float | None = None,
    force: bool = False,
    verify: bool = True,
    artifacts_dir: str | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ExportResult:
    """``export --refine-epochs``: choose as export does, refine that trial, export the
    refined trial verified. The output folder is checked before the long fine-tune."""
    from autocompress import export

    export.check_out(Path(out).expanduser().absolute(), force)
    study = study_mod.load_existing_study(storage_url, study_name)
    info = study_mod.study_info(study, storage_url)
    chosen = export.choose_from_study(study, info, trial=trial, best=best, budgets=budgets,
                                      max_accuracy_drop=max_accuracy_drop)
    refined = refine_trial(storage_url, study_name, chosen.record.number, epochs,
                           artifacts_dir=artifacts_dir, on_step=on_step, on_note=on_note)
    return export.export_from_storage(
        storage_url, study_name, out=out, trial=refined.number, force=force, verify=verify,
        artifacts_dir=artifacts_dir,
        rule=f"{chosen.rule}; refined {epochs} epoch(s) as trial {refined.number}",
    )


def refine_json(record: TrialRecord) -> dict[str, object]:
    return {
        "trial": record.number,
        "parent_trial": record.attrs.get(trial_attrs.PARENT),
        "epochs": record.attrs.get(trial_attrs.REFINE_EPOCHS),
        "finetune_steps": record.plan.get("finetune_steps"),
        "accuracy": record.accuracy,
        "test_accuracy": record.test_accuracy,
        "size_bytes": record.size_bytes,
        "latency_vs_fp32": record.latency_vs_fp32,
        "feasible": record.feasible,
        "plan": json.loads(json.dumps(record.plan)),
    }


__all__ = ["RefineError", "refinable", "refine_and_export", "refine_start", "refine_trial",
           "steps_for"]
