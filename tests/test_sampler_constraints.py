"""The budgets reach the sampler: rejected plans are stored the way the search stores them
(PRUNED, constraint > 0, no objective values), and the default sampler learns from them to
propose fewer infeasible plans than random search does."""

from __future__ import annotations

import warnings

import optuna
import pytest

from autocompress.study import make_sampler


def _infeasible_proposals(sampler_name: str, seed: int, trials: int = 60) -> int:
    """A toy search with the product's trial shape: ten 'prune ratios'; a plan whose total
    kept share exceeds a budget is rejected before any 'fine-tune'."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_sampler(sampler_name, seed, startup_trials=10),
    )
    infeasible = 0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        nonlocal infeasible
        ratios = [trial.suggest_float(f"prune/{i}", 0.0, 0.7, step=0.05) for i in range(10)]
        kept = sum(1 - r for r in ratios) / 10
        violation = (kept - 0.55) / 0.55  # "latency" budget: at most 55% of the work left
        trial.set_constraint("latency", violation)
        if violation > 0:
            infeasible += 1
            raise optuna.TrialPruned("over budget at pre-check")
        return 1.0 - sum(r * r for r in ratios) / 10, kept

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=trials)
    return infeasible


@pytest.mark.parametrize("seed", [0, 1])
def test_default_sampler_proposes_fewer_infeasible_plans_than_random(seed: int) -> None:
    tpe = _infeasible_proposals("tpe", seed)
    rand = _infeasible_proposals("random", seed)
    assert tpe < rand * 0.8, (tpe, rand)
