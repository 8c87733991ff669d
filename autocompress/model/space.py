"""The search space: the only module that calls ``trial.suggest_*``.

Parameter names are stable and readable so a study can be resumed and read by people (the
ranges are the search's ``SpaceSettings``, named as its options):

    bits/<layer>      categorical over bits                  e.g. bits/layer1.0.conv1
    prune/<group>     float 0..prune_max in prune_step steps e.g. prune/layer1.0.conv1
    kd/temperature    float kd_temperature_min..max
    kd/alpha          float kd_alpha_min..max
    quant/activations categorical over activation_bits (only when there are two or
                      more: 8 = uint8 activations and integer kernels, 32 = weight-only)
    quant/activation_scheme  categorical asymmetric/symmetric (only when the study's
                      activation_scheme is "search"): one scheme for the whole plan, since
                      int8 next to uint8 activations costs a requantize between layers
    sparsity/<layer>  float 0..sparsity_max in sparsity_step steps (scope "layer")
    sparsity/global   one such float ranked across all layers (scope "global")
    kd/features       categorical off/on, and kd/feature_weight (log float) when on
                      (only when feature_weight_max > 0)
    realise           categorical qat / ptq-<method> (only when ptq_methods are given)

``params_to_plan(plan_to_params(plan)) == plan`` for every plan the space can produce; the
search relies on it to enqueue baselines and to rebuild any trial from its params alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Protocol

from autocompress.config.settings import SpaceSettings
from autocompress.errors import ConfigError
from autocompress.model.inventory import Inventory
from autocompress.model.plan import CompressionPlan


class _Suggests(Protocol):
    """The part of ``optuna.Trial`` this module uses (keeps optuna out of the import)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = ...,
                      log: bool = ...) -> float: ...


ACTIVATIONS_PARAM = "quant/activations"
ACTIVATION_SCHEME_PARAM = "quant/activation_scheme"
SCHEME_CHOICES = ("asymmetric", "symmetric")
SEARCHED_SCHEME = "search"  # SpaceSettings.activation_scheme letting the sampler choose
GLOBAL_SPARSITY_PARAM = "sparsity/global"
FEATURES_PARAM = "kd/features"
FEATURE_WEIGHT_PARAM = "kd/feature_weight"
REALISE_PARAM = "realise"
# The lowest feature-distillation weight searched, as a share of feature_weight_max.
_FEATURE_WEIGHT_LOW = 0.05
# Stage outputs matched by feature distillation when the user names none: the last few.
_STAGES = 3
WEIGHT_ONLY = 32  # activation_bits of a weight-only plan: float activations


def bits_param(layer: str) -> str:
    return f"bits/{layer}"


def prune_param(group: str) -> str:
    return f"prune/{group}"


def sparsity_param(layer: str) -> str:
    return f"sparsity/{layer}"


def _grid_high(high: float, step: float) -> float:
    steps = int(round(high / step, 6) // 1)
    return round(steps * step, 10)


def feature_layers(inventory: Inventory, settings: SpaceSettings) -> list[str]:
    """The layers feature distillation matches: the user's, or the model's stage outputs.

    A stage is a run of top-level modules whose outputs keep one feature-map shape; its last
    module's output is what the next stage reads (ResNet's layer1..layer3, the demo's
    residual blocks). Modules inside one container are used when the top level has fewer
    than two stages (torchvision's ``features`` Sequential). The last ``_STAGES`` count.
    """
    if settings.feature_layers:
        return list(settings.feature_layers)
    for depth in (0, 1):
        stages: list[tuple[str, tuple[int, ...]]] = []
        for layer in inventory.layers:
            shape = tuple(layer.output_shape or ())
            if layer.name.count(".") != depth or len(shape) < 3 or _spatial(shape) <= 1:
                continue
            if stages and stages[-1][1] == shape:
                stages[-1] = (layer.name, shape)
            else:
                stages.append((layer.name, shape))
        if len(stages) >= 2:
            return [name for name, _ in stages[-_STAGES:]]
    return _repeated_blocks(inventory)


def _repeated_blocks(inventory: Inventory) -> list[str]:
    """A transformer's hidden states: the outputs of the longest list of sibling blocks
    (``encoder.layer.0``, ``.1``, ... or ``encoder_layer_0``, ...) that all keep one shape;
    its last ``_STAGES`` blocks."""
    lists: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for layer in inventory.layers:
        parent, _, leaf = layer.name.rpartition(".")
        if not layer.output_shape or not leaf[-1:].isdigit():
            continue  # list members end in their index
        lists.setdefault(parent + "." + leaf.rstrip("0123456789"), []).append(
            (layer.name, tuple(layer.output_shape)))
    runs = [members for members in lists.values()
            if len(members) >= 2 and len({shape for _, shape in members}) == 1]
    if not runs:
        return []
    return [name for name, _ in max(runs, key=len)[-_STAGES:]]


def _spatial(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape[2:]:
        total *= int(n)
    return total


def _searchable_layers(inventory: Inventory) -> list[str]:
    return [layer.name for layer in inventory.layers if layer.quantizable]


def _searchable_groups(inventory: Inventory, settings: SpaceSettings) -> list[str]:
    if settings.prune_max <= 0:
        return []
    return [group.name for group in inventory.groups if group.prunable]


def check_space(inventory: Inventory, settings: SpaceSettings) -> None:
    """An empty space is a user error: there would be nothing to search; so are feature
    layers the model does not have."""
    names = {layer.name for layer in inventory.layers}
    unknown = [n for n in settings.feature_layers if n not in names]
    if unknown:
        shown = ", ".join(feature_layers(inventory,
                                         dataclasses.replace(settings, feature_layers=())))
        raise ConfigError(
            f"feature_layers {unknown} do not exist in this model; name modules from "
            f"`autocompress profile` (the stage outputs here: {shown or 'none found'})"
        )
    if settings.feature_weight_max > 0 and not feature_layers(inventory, settings):
        raise ConfigError(
            "feature distillation is on (feature_weight_max > 0) but no stage outputs were "
            "found in this model; name the layers to match with --feature-layers"
        )
    layers = _searchable_layers(inventory)
    groups = _searchable_groups(inventory, settings)
    if not groups and (not layers or set(settings.bits) == {32}):
        raise ConfigError(
            "the search space is empty: no quantizable layer with bits other than 32 and no "
            "prunable group; allow bits 8/4 (bits: [32, 8, 4]) or a prune_max above 0"
        )


def activations_for(bits: int, settings: SpaceSettings) -> int:
    """The activations a uniform or guided plan at ``bits`` uses: int8 with uint8
    activations (integer kernels), int4 weight-only (int4 weights behind uint8 activations
    ran 1.5x slower than fp32 on ResNet-20 without int4 kernels; weight-only int4 runs at
    float speed), each where the space allows it."""
    wanted = 8 if bits == 8 else WEIGHT_ONLY
    return wanted if wanted in settings.activation_bits else settings.activation_bits[0]


def prune_high(settings: SpaceSettings) -> float:
    """Largest ratio on the step grid that does not exceed prune_max."""
    return _grid_high(settings.prune_max, settings.prune_step)


def suggest_plan(
    trial: _Suggests, inventory: Inventory, settings: SpaceSettings
) -> CompressionPlan:
    """Ask the sampler for one candidate plan."""
    bits = {
        layer: int(trial.suggest_categorical(bits_param(layer), list(settings.bits)))
        for layer in _searchable_layers(inventory)
    }
    high = prune_high(settings)
    prune = {
        group: round(trial.suggest_float(prune_param(group), 0.0, high,
                                         step=settings.prune_step), 6)
        for group in _searchable_groups(inventory, settings)
    } if high > 0 else {}
    temperature = trial.suggest_float(
        "kd/temperature", settings.kd_temperature_min, settings.kd_temperature_max
    )
    alpha = trial.suggest_float("kd/alpha", settings.kd_alpha_min, settings.kd_alpha_max)
    activations = settings.activation_bits[0]
    if len(settings.activation_bits) > 1:
        activations = int(trial.suggest_categorical(ACTIVATIONS_PARAM,
                                                    list(settings.activation_bits)))
    extras: dict[str, Any] = {}
    sparse_high = _grid_high(settings.sparsity_max, settings.sparsity_step)
    if sparse_high > 0:
        if settings.sparsity_scope == "global":
            extras["global_sparsity"] = round(trial.suggest_float(
                GLOBAL_SPARSITY_PARAM, 0.0, sparse_high, step=settings.sparsity_step), 6)
        else:
            extras["sparsity"] = {
                layer: round(trial.suggest_float(sparsity_param(layer), 0.0, sparse_high,
                                                 step=settings.sparsity_step), 6)
                for layer in _searchable_layers(inventory)
            }
    pairs = feature_layers(inventory, settings) if settings.feature_weight_max > 0 else []
    if pairs and trial.suggest_categorical(FEATURES_PARAM, ["off", "on"]) == "on":
        extras["feature_pairs"] = tuple((name, name) for name in pairs)
        extras["feature_weight"] = trial.suggest_float(
            FEATURE_WEIGHT_PARAM, _FEATURE_WEIGHT_LOW * settings.feature_weight_max,
            settings.feature_weight_max, log=True)
    if settings.ptq_methods:
        realise = str(trial.suggest_categorical(REALISE_PARAM, realisations(settings)))
        extras.update(_realisation(realise))
    if settings.activation_scheme == SEARCHED_SCHEME:
        extras["activation_scheme"] = str(trial.suggest_categorical(ACTIVATION_SCHEME_PARAM,
                                                                    list(SCHEME_CHOICES)))
    return _plan(settings, bits, prune, temperature, alpha, activations, **extras)



def realisations(settings: SpaceSettings) -> list[str]:
    """The choices of the ``realise`` parameter: QAT + KD, or PTQ with each method."""
    return ["qat", *(f"ptq-{m}" for m in settings.ptq_methods)]


def _realisation(choice: str) -> dict[str, Any]:
    if choice == "qat":
        return {}
    return {"realisation": "ptq", "calibration": choice.removeprefix("ptq-")}


def ptq_twins(
    named: list[tuple[str, CompressionPlan]], settings: SpaceSettings, *, every_method: str = ""
) -> list[tuple[str, CompressionPlan]]:
    """PTQ versions of QAT plans (the first of settings.ptq_methods; every method for the plan
    named ``every_method``), each named ``<name>-ptq-<method>``: a plan realised by PTQ costs
    a calibration and a measurement, so they open the search cheaply."""
    out: list[tuple[str, CompressionPlan]] = []
    for name, plan in named:
        methods = settings.ptq_methods if name == every_method else settings.ptq_methods[:1]
        out += [(f"{name}-ptq-{m}", dataclasses.replace(plan, realisation="ptq",
                                                          calibration=m)) for m in methods]
    return out


def as_qat(plan: CompressionPlan) -> CompressionPlan:
    """The plan realised by QAT + KD: what a promotion or refine of a PTQ candidate trains
    (a longer fine-tune of a plan with none would be the same file again)."""
    if not plan.is_ptq:
        return plan
    return dataclasses.replace(plan, realisation="qat", calibration="minmax")


def realisation_choice(plan: CompressionPlan) -> str:
    return f"ptq-{plan.calibration}" if plan.is_ptq else "qat"


def _plan(
    settings: SpaceSettings,
    bits: dict[str, int],
    prune: dict[str, float],
    temperature: float,
    alpha: float,
    activation_bits: int,
    **extras: Any,
) -> CompressionPlan:
    # A search resolves an unset learning rate (lrprobe) before it makes any plan; plans made
    # outside a search for their structure alone keep CompressionPlan's default.
    rate = {} if settings.learning_rate is None else {"learning_rate": settings.learning_rate}
    scheme = settings.activation_scheme
    if scheme != SEARCHED_SCHEME:  # a fixed scheme; "search": the sampler's, or asymmetric
        extras["activation_scheme"] = scheme
    return CompressionPlan(
        bits=bits,
        prune=prune,
        kd_temperature=temperature,
        kd_alpha=alpha,
        activation_bits=activation_bits,
        finetune_steps=settings.finetune_steps,
        **rate,
        **extras,
    )


def plan_to_params(plan: CompressionPlan, inventory: Inventory, settings: SpaceSettings) -> dict:
    """The Optuna params that make ``suggest_plan`` return this plan (for enqueue_trial)."""
    params: dict[str, Any] = {
        bits_param(layer): plan.bits_for(layer) for layer in _searchable_layers(inventory)
    }
    if prune_high(settings) > 0:
        for group in _searchable_groups(inventory, settings):
            params[prune_param(group)] = plan.ratio_for(group)
    params["kd/temperature"] = plan.kd_temperature
    params["kd/alpha"] = plan.kd_alpha
    if len(settings.activation_bits) > 1:
        params[ACTIVATIONS_PARAM] = plan.activation_bits
    if _grid_high(settings.sparsity_max, settings.sparsity_step) > 0:
        if settings.sparsity_scope == "global":
            params[GLOBAL_SPARSITY_PARAM] = plan.global_sparsity
        else:
            for layer in _searchable_layers(inventory):
                params[sparsity_param(layer)] = plan.sparsity.get(layer, 0.0)
    if settings.feature_weight_max > 0 and feature_layers(inventory, settings):
        on = plan.feature_weight > 0 and bool(plan.feature_pairs)
        params[FEATURES_PARAM] = "on" if on else "off"
        if on:
            params[FEATURE_WEIGHT_PARAM] = plan.feature_weight
    if settings.ptq_methods:
        params[REALISE_PARAM] = realisation_choice(plan)
    if settings.activation_scheme == SEARCHED_SCHEME:
        params[ACTIVATION_SCHEME_PARAM] = plan.activation_scheme
    return params


def params_to_plan(
    params: dict[str, Any], inventory: Inventory, settings: SpaceSettings
) -> CompressionPlan:
    bits = {layer: int(params[bits_param(layer)]) for layer in _searchable_layers(inventory)}
    prune = {
        group: round(float(params[prune_param(group)]), 6)
        for group in _searchable_groups(inventory, settings)
        if prune_param(group) in params
    }
    activations = int(params.get(ACTIVATIONS_PARAM, settings.activation_bits[0]))
    extras: dict[str, Any] = {}
    if GLOBAL_SPARSITY_PARAM in params:
        extras["global_sparsity"] = round(float(params[GLOBAL_SPARSITY_PARAM]), 6)
    sparse = {layer: round(float(params[sparsity_param(layer)]), 6)
              for layer in _searchable_layers(inventory) if sparsity_param(layer) in params}
    if sparse:
        extras["sparsity"] = sparse
    if params.get(FEATURES_PARAM) == "on":
        extras["feature_pairs"] = tuple((n, n) for n in feature_layers(inventory, settings))
        extras["feature_weight"] = float(params[FEATURE_WEIGHT_PARAM])
    if REALISE_PARAM in params:
        extras.update(_realisation(str(params[REALISE_PARAM])))
    if ACTIVATION_SCHEME_PARAM in params:
        extras["activation_scheme"] = str(params[ACTIVATION_SCHEME_PARAM])
    return _plan(settings, bits, prune, float(params["kd/temperature"]),
                 float(params["kd/alpha"]), activations, **extras)


def uniform_plan(
    inventory: Inventory,
    settings: SpaceSettings,
    *,
    bits: int,
    ratio: float = 0.0,
    activation_bits: int | None = None,
) -> CompressionPlan:
    """Every searchable layer at ``bits`` and every group at ``ratio`` (baselines, floors);
    activations at the first of settings.activation_bits unless given."""
    middle_t = (settings.kd_temperature_min + settings.kd_temperature_max) / 2
    middle_a = (settings.kd_alpha_min + settings.kd_alpha_max) / 2
    prune = (
        {group: ratio for group in _searchable_groups(inventory, settings)}
        if prune_high(settings) > 0
        else {}
    )
    layer_bits = {layer: bits for layer in _searchable_layers(inventory)}
    activations = settings.activation_bits[0] if activation_bits is None else activation_bits
    return _plan(settings, layer_bits, prune, middle_t, middle_a, activations)


def space_description(inventory: Inventory, settings: SpaceSettings) -> dict[str, Any]:
    """Plain description stored on the study; its hash decides whether a resume is allowed."""
    return {
        "bits": list(settings.bits),
        "layers": _searchable_layers(inventory),
        "groups": _searchable_groups(inventory, settings),
        "prune_max": prune_high(settings),
        "prune_step": settings.prune_step,
        "kd_temperature": [settings.kd_temperature_min, settings.kd_temperature_max],
        "kd_alpha": [settings.kd_alpha_min, settings.kd_alpha_max],
        "finetune_steps": settings.finetune_steps,
        "activation_bits": list(settings.activation_bits),
        # Added with unstructured sparsity, feature KD and PTQ: present only when used, so a
        # study made before them keeps its hash and can be resumed.
        **({"sparsity": [settings.sparsity_scope, _grid_high(settings.sparsity_max,
                                                           settings.sparsity_step),
                         settings.sparsity_step]} if settings.sparsity_max > 0 else {}),
        **({"size_metric": settings.size_metric} if settings.size_metric != "file" else {}),
        **({"feature_kd": [settings.feature_weight_max, feature_layers(inventory, settings)]}
           if settings.feature_weight_max > 0 else {}),
        **({"ptq_methods": list(settings.ptq_methods)} if settings.ptq_methods else {}),
        **({"activation_scheme": settings.activation_scheme}
           if settings.activation_scheme != "asymmetric" else {}),
    }


def space_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
