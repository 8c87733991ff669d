"""The search space: the only module that calls ``trial.suggest_*``.

Parameter names are stable and readable so a study can be resumed and read by people:

    bits/<layer>      categorical over config.bits          e.g. bits/layer1.0.conv1
    prune/<group>     float 0..prune_max in prune_step steps e.g. prune/layer1.0.conv1
    kd/temperature    float kd_temperature_min..max
    kd/alpha          float kd_alpha_min..max
    quant/activations categorical over config.activation_bits (only when there are two or
                      more: 8 = uint8 activations and integer kernels, 32 = weight-only)

``params_to_plan(plan_to_params(plan)) == plan`` for every plan the space can produce; the
search relies on it to enqueue baselines and to rebuild any trial from its params alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from autocompress.config import SearchConfig
from autocompress.errors import ConfigError
from autocompress.inventory import Inventory
from autocompress.plan import CompressionPlan


class _Suggests(Protocol):
    """The part of ``optuna.Trial`` this module uses (keeps optuna out of the import)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = ...,
                      log: bool = ...) -> float: ...


ACTIVATIONS_PARAM = "quant/activations"
WEIGHT_ONLY = 32  # activation_bits of a weight-only plan: float activations


def bits_param(layer: str) -> str:
    return f"bits/{layer}"


def prune_param(group: str) -> str:
    return f"prune/{group}"


def _searchable_layers(inventory: Inventory) -> list[str]:
    return [layer.name for layer in inventory.layers if layer.quantizable]


def _searchable_groups(inventory: Inventory, config: SearchConfig) -> list[str]:
    if config.prune_max <= 0:
        return []
    return [group.name for group in inventory.groups if group.prunable]


def check_space(inventory: Inventory, config: SearchConfig) -> None:
    """An empty space is a user error: there would be nothing to search."""
    layers = _searchable_layers(inventory)
    groups = _searchable_groups(inventory, config)
    if not groups and (not layers or set(config.bits) == {32}):
        raise ConfigError(
            "the search space is empty: no quantizable layer with bits other than 32 and no "
            "prunable group; allow bits 8/4 (bits: [32, 8, 4]) or a prune_max above 0"
        )


def activations_for(bits: int, config: SearchConfig) -> int:
    """The activations a uniform or guided plan at ``bits`` uses: int8 with uint8
    activations (integer kernels), int4 weight-only (int4 weights behind uint8 activations
    ran 1.5x slower than fp32 on ResNet-20 without int4 kernels; weight-only int4 runs at
    float speed), each where the space allows it."""
    wanted = 8 if bits == 8 else WEIGHT_ONLY
    return wanted if wanted in config.activation_bits else config.activation_bits[0]


def prune_high(config: SearchConfig) -> float:
    """Largest ratio on the step grid that does not exceed prune_max."""
    steps = int(round(config.prune_max / config.prune_step, 6) // 1)
    return round(steps * config.prune_step, 10)


def suggest_plan(trial: _Suggests, inventory: Inventory, config: SearchConfig) -> CompressionPlan:
    """Ask the sampler for one candidate plan."""
    bits = {
        layer: int(trial.suggest_categorical(bits_param(layer), list(config.bits)))
        for layer in _searchable_layers(inventory)
    }
    high = prune_high(config)
    prune = {
        group: round(trial.suggest_float(prune_param(group), 0.0, high, step=config.prune_step), 6)
        for group in _searchable_groups(inventory, config)
    } if high > 0 else {}
    temperature = trial.suggest_float(
        "kd/temperature", config.kd_temperature_min, config.kd_temperature_max
    )
    alpha = trial.suggest_float("kd/alpha", config.kd_alpha_min, config.kd_alpha_max)
    activations = config.activation_bits[0]
    if len(config.activation_bits) > 1:
        activations = int(trial.suggest_categorical(ACTIVATIONS_PARAM,
                                                    list(config.activation_bits)))
    return _plan(config, bits, prune, temperature, alpha, activations)


def _plan(
    config: SearchConfig,
    bits: dict[str, int],
    prune: dict[str, float],
    temperature: float,
    alpha: float,
    activation_bits: int,
) -> CompressionPlan:
    # A search resolves an unset learning rate (lrprobe) before it makes any plan; plans made
    # outside a search for their structure alone keep CompressionPlan's default.
    rate = {} if config.learning_rate is None else {"learning_rate": config.learning_rate}
    return CompressionPlan(
        bits=bits,
        prune=prune,
        kd_temperature=temperature,
        kd_alpha=alpha,
        activation_bits=activation_bits,
        finetune_steps=config.finetune_steps,
        **rate,
    )


def plan_to_params(plan: CompressionPlan, inventory: Inventory, config: SearchConfig) -> dict:
    """The Optuna params that make ``suggest_plan`` return this plan (for enqueue_trial)."""
    params: dict[str, Any] = {
        bits_param(layer): plan.bits_for(layer) for layer in _searchable_layers(inventory)
    }
    if prune_high(config) > 0:
        for group in _searchable_groups(inventory, config):
            params[prune_param(group)] = plan.ratio_for(group)
    params["kd/temperature"] = plan.kd_temperature
    params["kd/alpha"] = plan.kd_alpha
    if len(config.activation_bits) > 1:
        params[ACTIVATIONS_PARAM] = plan.activation_bits
    return params


def params_to_plan(
    params: dict[str, Any], inventory: Inventory, config: SearchConfig
) -> CompressionPlan:
    bits = {layer: int(params[bits_param(layer)]) for layer in _searchable_layers(inventory)}
    prune = {
        group: round(float(params[prune_param(group)]), 6)
        for group in _searchable_groups(inventory, config)
        if prune_param(group) in params
    }
    activations = int(params.get(ACTIVATIONS_PARAM, config.activation_bits[0]))
    return _plan(config, bits, prune, float(params["kd/temperature"]),
                 float(params["kd/alpha"]), activations)


def uniform_plan(
    inventory: Inventory,
    config: SearchConfig,
    *,
    bits: int,
    ratio: float = 0.0,
    activation_bits: int | None = None,
) -> CompressionPlan:
    """Every searchable layer at ``bits`` and every group at ``ratio`` (baselines, floors);
    activations at the first of config.activation_bits unless given."""
    middle_t = (config.kd_temperature_min + config.kd_temperature_max) / 2
    middle_a = (config.kd_alpha_min + config.kd_alpha_max) / 2
    prune = (
        {group: ratio for group in _searchable_groups(inventory, config)}
        if prune_high(config) > 0
        else {}
    )
    layer_bits = {layer: bits for layer in _searchable_layers(inventory)}
    activations = config.activation_bits[0] if activation_bits is None else activation_bits
    return _plan(config, layer_bits, prune, middle_t, middle_a, activations)


def space_description(inventory: Inventory, config: SearchConfig) -> dict[str, Any]:
    """Plain description stored on the study; its hash decides whether a resume is allowed."""
    return {
        "bits": list(config.bits),
        "layers": _searchable_layers(inventory),
        "groups": _searchable_groups(inventory, config),
        "prune_max": prune_high(config),
        "prune_step": config.prune_step,
        "kd_temperature": [config.kd_temperature_min, config.kd_temperature_max],
        "kd_alpha": [config.kd_alpha_min, config.kd_alpha_max],
        "finetune_steps": config.finetune_steps,
        "activation_bits": list(config.activation_bits),
    }


def space_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
