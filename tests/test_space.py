"""The search space: stable readable names, and plan -> params -> plan is the identity."""

from __future__ import annotations

import optuna
import pytest

from autocompress.config import SearchConfig
from autocompress.errors import ConfigError
from autocompress.inventory import Inventory, LayerInfo, PruneGroup
from autocompress.space import (
    check_space,
    params_to_plan,
    plan_to_params,
    space_description,
    space_hash,
    suggest_plan,
    uniform_plan,
)


def _inventory() -> Inventory:
    layers = [
        LayerInfo("stem", "Conv2d", 288, 18432, [1, 32, 8, 8], True, None),
        LayerInfo("layer1.0.conv1", "Conv2d", 9216, 589824, [1, 32, 8, 8], True, None),
        LayerInfo("fc", "Linear", 650, 640, [1, 10], True, None),
    ]
    groups = [
        PruneGroup("stem", ["stem"], 32, True, None),
        PruneGroup("layer1.0.conv1", ["layer1.0.conv1"], 32, True, None),
        PruneGroup("fc", ["fc"], 10, False, "classifier output: its channels are the classes"),
    ]
    return Inventory(layers, groups)


def test_parameter_names_are_readable() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    suggest_plan(trial, _inventory(), SearchConfig())
    assert set(trial.params) == {
        "bits/stem", "bits/layer1.0.conv1", "bits/fc",
        "prune/stem", "prune/layer1.0.conv1", "kd/temperature", "kd/alpha",
        "quant/activations",
    }
    one = optuna.create_study(directions=["maximize", "minimize"]).ask()
    plan = suggest_plan(one, _inventory(), SearchConfig(activation_bits=(32,)))
    assert "quant/activations" not in one.params and plan.activation_bits == 32


@pytest.mark.parametrize("seed", range(5))
def test_plan_params_plan_identity(seed: int) -> None:
    inv, config = _inventory(), SearchConfig()
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    trial = study.ask()
    plan = suggest_plan(trial, inv, config)
    params = plan_to_params(plan, inv, config)
    assert params == pytest.approx(trial.params)
    assert params_to_plan(params, inv, config) == plan
    for ratio in plan.prune.values():  # on the 0.05 grid, never above 0.7
        assert 0 <= ratio <= 0.7 and abs(ratio / 0.05 - round(ratio / 0.05)) < 1e-6


def test_enqueued_plan_comes_back_unchanged() -> None:
    inv, config = _inventory(), SearchConfig()
    plan = uniform_plan(inv, config, bits=4, ratio=0.5)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(plan_to_params(plan, inv, config))
    assert suggest_plan(study.ask(), inv, config) == plan


def test_empty_space_is_refused() -> None:
    config = SearchConfig(bits=(32,), prune_max=0.0)
    with pytest.raises(ConfigError, match="search space is empty"):
        check_space(_inventory(), config)


def test_space_hash_changes_with_space() -> None:
    inv = _inventory()
    a = space_hash(space_description(inv, SearchConfig()))
    b = space_hash(space_description(inv, SearchConfig(bits=(8, 4))))
    assert a != b and a == space_hash(space_description(inv, SearchConfig()))


def test_public_names_never_shadow_submodules() -> None:
    """Regression: exporting the function ``prune`` at the top level made
    ``from autocompress import prune`` return the function instead of the module."""
    import importlib
    import pkgutil

    import autocompress

    submodules = {m.name for m in pkgutil.iter_modules(autocompress.__path__)}
    assert not submodules & set(autocompress.__all__)
    assert autocompress.prune_model is importlib.import_module("autocompress.prune").prune
    from autocompress import prune

    assert hasattr(prune, "dependency_groups")
