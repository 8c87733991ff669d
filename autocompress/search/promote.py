"""Running the promotions ``promotion.plan_promotions`` chooses: costed by each retrain's own
plan and phase mix (``retrain_cost``), queued with where each starts, run as linked trials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autocompress import study as study_mod
from autocompress.config.settings import SearchSettings
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.search import retrain_cost
from autocompress.search.counter import TrialCounter, probe_step_seconds
from autocompress.search.promotion import plan_promotions
from autocompress.search.refine import enqueue_retrain, refine_start
from autocompress.search.session import LR_PROBE_ATTR, _say
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord
from autocompress.trial.runner import TrialRunner

PROMOTION_PLAN_MARGIN = 0.95  # of the time left a timed promotion is planned to take


def promote(
    study: Any,
    runner: TrialRunner,
    settings: SearchSettings,
    counter: TrialCounter,
    callback: Callable[[Any, Any], None],
    on_start: Callable[[str], None] | None,
) -> bool:
    """Retrain the front's most valuable plans longer (see ``promotion``), as linked trials;
    False when none was chosen."""
    reference_size = 1.1 * measure.file_size(runner.ctx.fp32_onnx)
    pace = probe_step_seconds(study.user_attrs.get(LR_PROBE_ATTR))
    steps = settings.space.finetune_steps

    with study_mod.study_lock(study):  # two workers never promote the same plan
        recs = study_mod.records(study)
        by_number = {r.number: r for r in recs}
        ratio = retrain_cost.recovery_over_qat(recs)

        def _costed(number: int, retrain_steps: int) -> tuple[dict[str, float], int | None]:
            # the retrain's own mix of BatchNorm-live and QAT steps (search/retrain_cost.py)
            record = by_number[number]
            timed = retrain_cost.retrain_timing(
                record, retrain_steps, ratio=ratio,
                recovers=_retrain_start(record, retrain_steps) == "teacher")
            return timed or _trial_timing(record, pace, steps)

        short = [r for r in recs if r.measured and r.baseline is None
                 and r.attrs.get(trial_attrs.TIMING) and r.attrs.get(trial_attrs.PARENT) is None]
        timed = settings.run.time_limit is not None
        # a little under the time left: one stretched to exactly that failed the fit check a
        # moment later ("about 349 s here and 349 s ... left": no promotion ran)
        margin = PROMOTION_PLAN_MARGIN if timed else 1.0
        chosen = plan_promotions(recs, settings.promotion, effort=margin * counter.promotion_effort(
            [_trial_timing(r, pace, steps) for r in short]), reference_size=reference_size,
            stretch=timed)
        if chosen and timed:
            # The first retrain takes most of the time: cost it at its own plan's speed
            # (int8 QAT steps ran 0.33 s where the mean short trial's ran 0.24 s, and a
            # retrain costed at the mean ran a 15-minute search 3 minutes past its limit).
            own = margin * counter.promotion_effort([_costed(chosen[0].parent,
                                                             chosen[0].steps)])
            if own > 0:
                chosen = plan_promotions(recs, settings.promotion, effort=own,
                                         reference_size=reference_size, stretch=True)
            fit = counter.promotions_that_fit([(*_costed(p.parent, p.steps), p.cost)
                                               for p in chosen])
            if fit < len(chosen):
                _say(counter.declined or "", on_start)
                chosen = chosen[:fit]
        for p in chosen:  # from where a refine that long would start (refine_start)
            enqueue_retrain(study, runner, settings, by_number[p.parent], p.steps,
                            {trial_attrs.PROMOTION_RUNG: p.rung})
    if not chosen:
        return False
    _say(f"promoting {len(chosen)} plan(s) to longer fine-tunes: "
         + ", ".join(f"#{p.parent} -> {p.steps} steps" for p in chosen), on_start)
    study.optimize(runner, n_trials=len(chosen), callbacks=[callback], catch=(Exception,))
    return True


def _retrain_start(parent: TrialRecord, steps: int) -> str:
    """Where a retrain of ``parent``'s plan for ``steps`` starts (``refine.refine_start``)."""
    return refine_start(space.as_qat(CompressionPlan.from_dict(parent.plan)), steps, parent)


def _trial_timing(record: TrialRecord, pace: float,
                  steps: int) -> tuple[dict[str, float], int | None]:
    """A trial's timing (seconds per stage) and the fine-tune steps it ran; a
    calibration-only trial's fine-tune is costed at the learning-rate probe's ``pace``
    (seconds a step) for ``steps`` steps, what its promotion will run."""
    ran = record.attrs.get(trial_attrs.FINETUNE_STEPS_RUN)
    timing = record.json_attr(trial_attrs.TIMING) or {}
    if (record.attrs.get(trial_attrs.FIDELITY) == "calibration" and pace > 0 and steps
            and not timing.get("finetune")):
        return {**timing, "finetune": pace * steps}, steps
    return timing, int(ran) if ran else None


__all__ = ["PROMOTION_PLAN_MARGIN", "promote"]
