"""The search space: stable readable names, and plan -> params -> plan is the identity."""

from __future__ import annotations

import optuna
import pytest

from autocompress.config.options import SearchConfig
from autocompress.errors import ConfigError
from autocompress.model.inventory import Inventory, LayerInfo, PruneGroup
from autocompress.model.space import (
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
    assert autocompress.prune_model is importlib.import_module("autocompress.transform.prune").prune
    from autocompress.transform import prune

    assert hasattr(prune, "dependency_groups")


_GUIDE = {"sparsity_max": 0.5, "feature_weight_max": 2.0,
          "feature_layers": ("stem", "layer1.0.conv1"),
          "ptq_methods": ("minmax", "entropy", "percentile")}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("seed", range(6))
def test_guide_techniques_round_trip_through_params(scope: str, seed: int) -> None:
    """Sparsity, feature KD and PTQ are search dimensions; every plan they make comes back
    from its params unchanged (resume, enqueue and rebuild rely on it)."""
    inv, config = _inventory(), SearchConfig(sparsity_scope=scope, **_GUIDE)
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    trial = study.ask()
    plan = suggest_plan(trial, inv, config)
    params = plan_to_params(plan, inv, config)
    assert params == pytest.approx(trial.params)
    assert params_to_plan(params, inv, config) == plan
    assert "realise" in trial.params and "kd/features" in trial.params
    if scope == "global":
        assert "sparsity/global" in trial.params and not plan.sparsity
        assert 0 <= plan.global_sparsity <= 0.5
    else:
        assert {"sparsity/stem", "sparsity/layer1.0.conv1", "sparsity/fc"} <= set(trial.params)
    if trial.params["kd/features"] == "on":
        assert plan.feature_pairs == (("stem", "stem"), ("layer1.0.conv1", "layer1.0.conv1"))
        assert 0.1 <= plan.feature_weight <= 2.0
    else:
        assert plan.feature_weight == 0 and "kd/feature_weight" not in trial.params
    assert plan.is_ptq == trial.params["realise"].startswith("ptq-")


def test_guide_techniques_change_the_space_hash_only_when_used() -> None:
    inv = _inventory()
    plain = space_description(inv, SearchConfig())
    assert "sparsity" not in plain and "ptq_methods" not in plain  # old studies still resume
    for change in ({"sparsity_max": 0.5}, {"size_metric": "zip"}, {"ptq_methods": ("minmax",)},
                   {"feature_weight_max": 1.0, "feature_layers": ("stem",)}):
        assert space_hash(space_description(inv, SearchConfig(**change))) != space_hash(plain)


def test_stage_outputs_are_the_default_feature_layers(demo_task) -> None:
    from autocompress.model.space import feature_layers
    from autocompress.transform.survey import build_inventory

    inv = build_inventory(demo_task.model, demo_task.data.example_input(1))
    assert feature_layers(inv, SearchConfig()) == ["block1", "block2"]
    assert feature_layers(inv, SearchConfig(feature_layers=("conv1",))) == ["conv1"]
