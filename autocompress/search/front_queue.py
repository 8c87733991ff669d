"""The default sampler's queue: when a search trial starts and nothing is queued, the
proposer (``proposals``) queues the next plan derived from the measured front, or nothing
(then Optuna's TPE samples one).

Proposals are made when a trial starts, not when one ends, so a run that ends (time limit,
Ctrl-C) leaves no stale proposal behind, and each proposal sees every trial finished so far,
this worker's and others'. Only this worker's fine-tuned trials can be inherited from (their
weights are in its memory); the proposer predicts accordingly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from autocompress import study as study_mod
from autocompress.config.settings import SearchSettings
from autocompress.errors import one_line
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.search.planning import FRONT_SAMPLER, GUIDED_PENDING_ATTR
from autocompress.search.proposals import Proposer, measured_trials
from autocompress.search.sensitivity import SENSITIVITY_ATTR, Sensitivity
from autocompress.search.session import _say
from autocompress.study import attrs as trial_attrs
from autocompress.trial.runner import TrialRunner

log = logging.getLogger("autocompress")


class FrontQueue:
    """``WorkerStudy.on_empty_queue`` for the default sampler."""

    def __init__(self, study: Any, runner: TrialRunner, proposer: Proposer,
                 settings: SearchSettings, on_start: Callable[[str], None] | None) -> None:
        self.study = study
        self.runner = runner
        self.proposer = proposer
        self.settings = settings
        self.on_start = on_start
        self.proposed = 0
        self.refused = 0  # candidates predicted dominated, never fine-tuned
        self.fallbacks = 0  # trials left to TPE: no candidate predicted to improve the front
        self.broken = False

    def __call__(self) -> bool:
        """Queue the next proposal; False (TPE samples the trial) when there is none. A
        failure here must not end the search (Optuna asks for the trial outside the trial's
        own error handling): it is logged once and the proposer is turned off."""
        if self.broken:
            return False
        try:
            return self._propose()
        except Exception as exc:
            self.broken = True
            log.warning("the front proposer failed (%s); TPE samples the rest of this run",
                        one_line(exc, typed=True))
            return False

    def _propose(self) -> bool:
        records = study_mod.records(self.study)
        def held(number: int) -> bool:
            return self.runner.lineage.get(number) is not None

        steps = self.settings.space.finetune_steps
        trials = measured_trials(records, held, steps)
        over = measured_trials(records, held, steps, feasible=False)
        # calibration-only trials are recorded as the PTQ plans they were realised as; the
        # proposer's candidates are QAT plans the runner will realise the same way (keyed
        # apart, one rejected shrink was proposed again 41 times in a row)
        realised = space.as_qat if self.runner.calibration_only else (lambda plan: plan)
        tried = set().union(*(self.proposer.keys(realised(CompressionPlan.from_dict(r.plan)))
                              for r in records if r.plan))
        run = {r.attrs.get(trial_attrs.GUIDED) for r in records}
        pending = [(name, plan) for name, plan in self._pending() if name not in run]
        outcome = self.proposer.propose(trials, tried, pending, over)
        self.refused += outcome.refused
        p = outcome.proposal
        if p is None:
            self.fallbacks += 1
            return False
        params = space.plan_to_params(p.plan, self.runner.ctx.inventory, self.settings.space)
        attrs: dict[str, Any] = {trial_attrs.PROPOSAL: p.kind,
                                 trial_attrs.PREDICTED_ACCURACY: round(p.predicted_accuracy, 4)}
        if p.parent >= 0:
            attrs[trial_attrs.PROPOSED_FROM] = p.parent
        if p.name is not None:
            attrs[trial_attrs.GUIDED] = p.name
        study_mod.enqueue(self.study, params, attrs)
        self.proposed += 1
        label = self.runner.ctx.task.metric.label
        what = (f"{p.name} (guided)" if p.name is not None else f"{p.kind} of #{p.parent}")
        _say(f"proposal {what}: {p.plan.summary()}, predicted {label} "
             f"{p.predicted_accuracy:.4f} at {p.predicted_size / 1000:.1f} KB "
             f"({outcome.refused} of {outcome.candidates} candidates predicted dominated)",
             self.on_start)
        return True

    def _pending(self) -> list[tuple[str, CompressionPlan]]:
        stored = self.study.user_attrs.get(GUIDED_PENDING_ATTR)
        if stored is None:
            return []
        return [(item["name"], CompressionPlan.from_dict(item["plan"]))
                for item in json.loads(stored)]

    def summary(self) -> str | None:
        if not (self.proposed or self.fallbacks):
            return None
        return (f"proposals: {self.proposed} from the front, {self.refused} candidates refused "
                f"as predicted dominated, {self.fallbacks} trial(s) left to TPE")


def front_queue(study: Any, runner: TrialRunner, settings: SearchSettings,
                on_start: Callable[[str], None] | None) -> FrontQueue | None:
    """The queue when the study uses the default sampler and has a sensitivity table (the
    proposer prices moves with it); None otherwise."""
    if settings.run.sampler != FRONT_SAMPLER:
        return None
    stored = study.user_attrs.get(SENSITIVITY_ATTR)
    if stored is None:
        _say("no sensitivity table (--no-guided, or its pass failed): the front proposer "
             "cannot price moves, so TPE samples the search trials", on_start)
        return None
    ctx = runner.ctx
    proposer = Proposer(Sensitivity.from_dict(json.loads(stored)), ctx.inventory,
                        settings.space, fp32_bytes=measure.file_size(ctx.fp32_onnx),
                        fp32_accuracy=ctx.fp32_accuracy,
                        predict_latency=ctx.latency_model.predict,
                        latency_budget=ctx.budget_ratio(),
                        size_budget=min((b.value for b in ctx.budgets if b.kind == "size"),
                                        default=None),
                        floor=ctx.fp32_accuracy - ctx.training.early_stop_drop,
                        latency_checks=lambda: ctx.latency_model.checked,
                        round_to=ctx.training.round_to)
    return FrontQueue(study, runner, proposer, settings, on_start)


__all__ = ["FrontQueue", "front_queue"]
