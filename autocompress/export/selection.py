"""Export's choice of trial: as asked (--trial), or the best within the budgets and limits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from autocompress import study as study_mod
from autocompress.config.budgets import Budget, parse_budget
from autocompress.export._results import Choice, ExportError
from autocompress.intake.metric import label_of
from autocompress.model.inventory import Inventory
from autocompress.results.metrics import accuracy_drop_rate
from autocompress.results.pareto import closest_to_budgets, drop_floor, fp32_record, select_best
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord


def parse_accuracy_drop(text: str | float | None) -> float | None:
    """``"1%"`` or ``"0.01"`` (or 0.01) -> 0.01; a fraction of the fp32 accuracy."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise ExportError(
            f"max accuracy drop {text!r} is not a fraction in [0, 1); write e.g. 1% or 0.01"
        )
    return value


def choose(
    records: Sequence[TrialRecord],
    study_budgets: Sequence[Budget],
    *,
    trial: int | None = None,
    best: bool = False,
    budgets: Sequence[str] = (),
    max_accuracy_drop: str | float | None = None,
    reference_accuracy: float | None = None,
    study_name: str = "",
    latency_reference_ms: float | None = None,
    metric: str = "accuracy",
) -> Choice:
    """The trial to export: ``trial`` as asked, or with ``best`` the highest validation
    accuracy within the study's budgets tightened by ``budgets`` and the accuracy-drop limit
    (relative to ``reference_accuracy``, the fp32 baseline's); ties to the smaller file."""
    if (trial is None) == (not best):
        raise ExportError("pass exactly one of --best or --trial N")
    if trial is not None:
        if budgets or max_accuracy_drop is not None:
            raise ExportError(
                "--budget and --max-accuracy-drop choose among trials with --best; "
                f"drop them to export trial {trial} as it is"
            )
        return Choice(record=_exportable(records, trial, study_name),
                      rule=f"trial {trial} as asked (--trial)")
    extra = [parse_budget(b) for b in budgets]
    if any(b.relative for b in extra):  # "0.6x": of the study's fp32 reference latency
        if latency_reference_ms is None:
            raise ExportError(
                f"--budget {', '.join(b.text for b in extra if b.relative)} is a share of the "
                f"fp32 latency, and study {study_name!r} recorded no fp32 latency reference; "
                "write a time such as 5ms"
            )
        extra = [b.resolve(latency_reference_ms) for b in extra]
    limits = list(study_budgets) + extra
    drop = parse_accuracy_drop(max_accuracy_drop)
    if drop is not None and reference_accuracy is None:
        raise ExportError(
            f"study {study_name!r} has no measured fp32 baseline to measure an accuracy drop "
            "against; drop --max-accuracy-drop or run a search with baselines"
        )
    selection = select_best(
        records, limits, max_accuracy_drop=drop, reference_accuracy=reference_accuracy,
        metric=metric,
    )
    if selection is None:
        raise ExportError(_nothing_feasible(records, limits, drop, reference_accuracy,
                                            study_name, metric))
    return Choice(
        record=selection.chosen,
        rule=selection.rule,
        runners_up=list(selection.runners_up),
        budgets=limits,
        max_accuracy_drop=drop,
        reference_accuracy=reference_accuracy,
    )


def _exportable(records: Sequence[TrialRecord], number: int, study_name: str) -> TrialRecord:
    record = next((r for r in records if r.number == number), None)
    if record is None:
        span = (f"trials {records[0].number}-{records[-1].number}" if records
                else "it has no trials")
        raise ExportError(
            f"trial {number} does not exist in study {study_name!r} ({span}); "
            "`autocompress show --all` lists them"
        )
    if record.state != "COMPLETE":
        why = (record.fail_reason or record.rejected
               or record.attrs.get(trial_attrs.EARLY_STOPPED) or "")
        raise ExportError(
            f"trial {number} did not complete (state {record.state}"
            f"{': ' + why if why else ''}); export a completed trial from `autocompress show`"
        )
    if record.rejected is not None or not record.measured:
        raise ExportError(
            f"trial {number} has no exported file ({record.rejected or 'not measured'}); "
            "export a measured trial from `autocompress show`"
        )
    return record


def _nothing_feasible(
    records: Sequence[TrialRecord],
    budgets: Sequence[Budget],
    drop: float | None,
    reference: float | None,
    study_name: str,
    metric: str = "accuracy",
) -> str:
    limits = [b.text for b in budgets]
    if drop is not None:
        limits.append(f"at most {drop:.2%} {metric} drop")
    closest = []
    for record, misses in closest_to_budgets(records, budgets, k=3):
        why = [] if misses == "meets budgets" else [misses]
        if drop is not None and reference:
            if record.accuracy is None:
                why.append(f"{metric} not measured (rejected at pre-check)")
            elif record.accuracy < drop_floor(reference, drop):
                why.append(f"{metric} drop "
                           f"{accuracy_drop_rate(reference, record.accuracy) or 0.0:.2%}")
        closest.append(f"trial {record.number}: {', '.join(why) or 'not measured'}")
    shown = "; ".join(closest) or "no measured trial"
    return (
        f"no trial of study {study_name!r} meets {', '.join(limits) or 'the budgets'}; "
        f"closest: {shown}; loosen --budget/--max-accuracy-drop, or run more trials"
    )


def choose_from_study(
    study: Any,
    info: study_mod.StudyInfo,
    *,
    trial: int | None = None,
    best: bool = False,
    budgets: Sequence[str] = (),
    max_accuracy_drop: str | float | None = None,
    records: Sequence[TrialRecord] | None = None,
) -> Choice:
    """``choose`` over a loaded study, against its budgets and fp32 accuracy."""
    records = study_mod.records(study) if records is None else records
    fp32 = fp32_record(records)
    # The fp32 baseline trial's validation accuracy; without one, the teacher's accuracy the
    # search measured on the same fp32 ONNX export before any trial.
    reference = fp32.accuracy if fp32 is not None else info.attrs.get("fp32_accuracy")
    return choose(
        records,
        [Budget.from_dict(b) for b in info.json_attr("budgets", []) or []],
        trial=trial,
        best=best,
        budgets=tuple(budgets),
        max_accuracy_drop=max_accuracy_drop,
        reference_accuracy=reference,
        study_name=info.name,
        latency_reference_ms=_first_reference_ms(info.attrs),
        metric=label_of(info.attrs.get("metric")),
    )


def _first_reference_ms(study_attrs: dict[str, Any]) -> float | None:
    """The fp32 latency reference of the machine that started the study (a resume elsewhere
    adds its own; "0.6x" is resolved against the first)."""
    from autocompress.runtime.latency_reference import stored_references

    refs = stored_references(study_attrs)
    return next(iter(refs.values())).median_ms if refs else None


def base_context(ctx: Any, record: TrialRecord, records: Sequence[TrialRecord]) -> Any:
    """Export's study context (``program._Context``) for ``record``: a ``--student`` trial
    is rebuilt from the student's spec, and its report's "before" is the student's inventory
    (recorded on its distillation trial); the teacher's trials keep the study's."""
    spec = record.base_model
    if spec is None:
        return ctx
    distilled = [r for r in records if r.measured
                 and r.attrs.get(trial_attrs.STUDENT_DISTILLED) == spec]
    stored = distilled[-1].json_attr(trial_attrs.STUDENT_INVENTORY) if distilled else None
    return dataclasses.replace(ctx, model_spec=spec,
                               inventory=Inventory.from_dict(stored) if stored else None)
