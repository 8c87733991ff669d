"""``evaluate_plan``: one candidate end to end, outside a search, measured like a trial.

    import autocompress
    from autocompress.intake import load_task
    task = load_task("autocompress.zoo:resnet20", "teacher.pt", "imagefolder:~/cifar10")
    plan = autocompress.CompressionPlan(bits={...}, finetune_steps=600)
    record = autocompress.evaluate_plan(task, plan, autocompress.SearchConfig(...))
    record.accuracy, record.size_bytes, record.latency_vs_fp32

The plan runs through the search's own trial runner (build, pre-check, QAT + KD fine-tune of
``plan.finetune_steps`` steps at ``plan.learning_rate`` unless the config sets one, export,
every figure measured on the exported file) in a scratch study that is deleted afterwards,
so hand recipes and benchmarks are measured exactly as search trials are. A plan over the
config's budgets is measured anyway (and recorded infeasible); no early stop.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from autocompress import study as study_mod
from autocompress.config.options import SearchConfig
from autocompress.errors import PlanError, TrainingError
from autocompress.intake import Task
from autocompress.model import space
from autocompress.model.plan import CompressionPlan
from autocompress.study import attrs as trial_attrs
from autocompress.study.records import TrialRecord

SCRATCH_STUDY = "evaluate-plan"


def evaluate_plan(
    task: Task,
    plan: CompressionPlan,
    config: SearchConfig | None = None,
    *,
    on_step: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TrialRecord:
    """Fine-tune, export and measure ``plan`` on ``task``; returns the trial's record.

    ``config`` gives the measurement conditions (threads, latency runs, batch size, budgets,
    the space the plan must lie in: bits and the prune grid); its model/data/storage fields
    are ignored. Raises TrainingError with the trial's failure reason when it fails.
    """
    from autocompress.search import session as sessions  # the search stack (torch, ORT) when called

    config = config or SearchConfig()
    with tempfile.TemporaryDirectory(prefix="autocompress-evaluate-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'evaluate.db'}"
        scratch = config.replace(
            study=SCRATCH_STUDY, storage=url, artifacts=str(Path(tmp) / "artifacts"),
            learning_rate=config.learning_rate or plan.learning_rate, time_limit=None,
        )
        storage = study_mod.open_storage(url)
        with sessions.torch_threads(scratch.fine_tune_threads()):
            session = sessions.open_session(scratch, url, storage, Path(tmp), on_note, task=task)
            plan.validate(session.inventory)
            settings = session.settings.space
            params = space.plan_to_params(plan, session.inventory, settings)
            _check_in_space(plan, space.params_to_plan(params, session.inventory, settings))
            study_mod.enqueue(session.study, params,
                              {trial_attrs.FINETUNE_STEPS: plan.finetune_steps}, first=True)
            session.runner.ctx.on_step = on_step
            session.study.optimize(session.runner, n_trials=1, catch=(Exception,))
        record = study_mod.records(session.study)[-1]
    if record.state != "COMPLETE" or not record.measured:
        raise TrainingError(f"evaluating plan {plan.summary()} failed: "
                            f"{record.fail_reason or record.rejected or record.state}")
    return record


def _check_in_space(plan: CompressionPlan, rebuilt: CompressionPlan) -> None:
    """The trial runs the plan the search space can express: refuse one it would change."""
    fields = ("bits", "prune", "sparsity", "global_sparsity", "activation_bits",
              "kd_temperature", "kd_alpha", "feature_pairs", "feature_weight", "realisation",
              "calibration")
    def normal(p: CompressionPlan, name: str) -> object:
        value = getattr(p, name)
        if name == "bits":  # a layer left out stays at 32 bits
            return {k: v for k, v in value.items() if v != 32}
        if name in ("prune", "sparsity"):  # a group left out keeps every channel
            return {k: v for k, v in value.items() if v > 0}
        return value

    differ = [f for f in fields if normal(plan, f) != normal(rebuilt, f)]
    if differ:
        raise PlanError(
            f"plan {plan.summary()!r} lies outside the config's search space ({', '.join(differ)}"
            " would change); widen the config (bits, activation_bits, prune_max/prune_step, "
            "sparsity_max/step/scope, feature_weight_max/feature_layers, ptq_methods, kd "
            "ranges) or change the plan"
        )


__all__ = ["evaluate_plan"]
