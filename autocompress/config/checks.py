"""The checks on a ``SearchConfig``: each setting's allowed values and ranges, as one-line
``ConfigError`` messages that name the key and an example of a good value."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from autocompress.config.budgets import parse_budget
from autocompress.errors import ConfigError

if TYPE_CHECKING:
    from autocompress.config.options import SearchConfig

SAMPLERS = ("tpe", "random", "nsga2", "gp")
OBJECTIVES = ("accuracy", "size", "latency")
SPARSITY_SCOPES = ("layer", "global")
SIZE_METRICS = ("file", "zip")
PTQ_METHODS = ("minmax", "entropy", "percentile", "dynamic")
# Where candidates are timed and scored (runtime.py dispatches on it).
TARGETS = ("onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "tensorrt")
MAX_STUDY_NAME = 120


def check_config(config: SearchConfig) -> None:
    """Raise a ConfigError for the first setting out of range (checked in field order)."""
    for check in (_check_search, _check_space, _check_task, _check_training, _check_run,
                  _check_study_name):
        check(config)


def _check_search(c: SearchConfig) -> None:
    for budget in c.budgets:
        parse_budget(budget)
    if c.trials < 1:
        raise ConfigError(f"trials {c.trials} must be at least 1 (--trials 20)")
    if c.sampler not in SAMPLERS:
        raise ConfigError(f"sampler {c.sampler!r} is unknown; use one of {list(SAMPLERS)}")
    if c.startup_trials is not None and c.startup_trials < 1:
        raise ConfigError(
            f"startup_trials {c.startup_trials} must be >= 1 (or left out for trials // 3)"
        )
    if not c.objectives or any(o not in OBJECTIVES for o in c.objectives):
        raise ConfigError(
            f"objectives {','.join(c.objectives)!r} invalid; use a comma list of "
            f"{list(OBJECTIVES)} starting with accuracy, e.g. accuracy,size,latency"
        )
    if c.objectives[0] != "accuracy" or len(set(c.objectives)) != len(c.objectives):
        raise ConfigError(
            "objectives must start with accuracy and not repeat, e.g. accuracy,size"
        )


def _check_space(c: SearchConfig) -> None:
    for b in c.bits:
        if b not in (32, 8, 4):
            raise ConfigError(f"bits value {b} is unsupported; use values from 32, 8, 4")
    if not c.bits:
        raise ConfigError("bits is empty: the search space has nothing to choose from")
    if not c.activation_bits or any(a not in (8, 32) for a in c.activation_bits) or (
            len(set(c.activation_bits)) != len(c.activation_bits)):
        raise ConfigError(
            f"activation_bits {list(c.activation_bits)} is invalid; use 8 (uint8 "
            "activations), 32 (weight-only) or both: 8,32"
        )
    if not 0.0 <= c.prune_max < 1.0:
        raise ConfigError(f"prune_max {c.prune_max} must be in [0, 1) (e.g. 0.7)")
    if not 0 < c.prune_step < 1:
        raise ConfigError(f"prune_step {c.prune_step} must be in (0, 1) (e.g. 0.05)")
    if not 0.0 <= c.sparsity_max < 1.0:
        raise ConfigError(f"sparsity_max {c.sparsity_max} must be in [0, 1) (e.g. 0.8; "
                          "0 turns unstructured sparsity off)")
    if not 0 < c.sparsity_step < 1:
        raise ConfigError(f"sparsity_step {c.sparsity_step} must be in (0, 1) (e.g. 0.1)")
    for key, value, allowed in (("sparsity_scope", c.sparsity_scope, SPARSITY_SCOPES),
                                ("size_metric", c.size_metric, SIZE_METRICS)):
        if value not in allowed:
            raise ConfigError(f"{key} {value!r} is unknown; use one of {list(allowed)}")


def _check_task(c: SearchConfig) -> None:
    if (c.mean is None) != (c.std is None) or (
            c.std is not None and (len(c.std) != len(c.mean or ())
                                   or min(c.std, default=1.0) <= 0)):
        raise ConfigError("mean and std go together, one value per input channel each, "
                          "std > 0 (e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
    if c.task is not None and any(v is not None for v in (c.model, c.data, c.weights)):
        raise ConfigError(f"task {c.task!r} brings its own model and data; drop model, "
                          "weights and data")
    if c.target not in TARGETS:
        raise ConfigError(f"target {c.target!r} is unknown; use one of {list(TARGETS)}")


def _check_training(c: SearchConfig) -> None:
    if not 0.0 <= c.feature_weight_max <= 100.0:
        raise ConfigError(f"feature_weight_max {c.feature_weight_max} must be in "
                          "[0, 100] (e.g. 1; 0 turns feature distillation off)")
    bad = [m for m in c.ptq_methods if m not in PTQ_METHODS]
    if bad or len(set(c.ptq_methods)) != len(c.ptq_methods):
        raise ConfigError(f"ptq_methods {list(c.ptq_methods)} is invalid; use any of "
                          f"{list(PTQ_METHODS)} once each, or none")
    if c.early_stop_drop is not None and not 0 < c.early_stop_drop <= 1:
        raise ConfigError(
            f"early_stop_drop {c.early_stop_drop} must be in (0, 1] (e.g. 0.25: stop a "
            "fine-tune whose accuracy fell 25 points below fp32's)"
        )
    if not 0 < c.kd_temperature_min <= c.kd_temperature_max:
        raise ConfigError("kd_temperature_min must be > 0 and <= kd_temperature_max")
    if not 0 <= c.kd_alpha_min <= c.kd_alpha_max <= 1:
        raise ConfigError("kd_alpha_min <= kd_alpha_max must both lie in [0, 1]")
    for name in ("finetune_steps", "batch_size", "threads", "latency_batch_size",
                 "latency_repeats", "round_to", "train_threads"):
        minimum = 0 if name == "finetune_steps" else 1
        if getattr(c, name) < minimum:
            raise ConfigError(f"{name} {getattr(c, name)} must be >= {minimum}")


def _check_run(c: SearchConfig) -> None:
    if c.max_rejections < 1:
        raise ConfigError(
            f"max_rejections {c.max_rejections} must be >= 1 (e.g. 50 plans rejected "
            "in a row before the search gives up)"
        )
    if c.time_limit is not None and not (0 < c.time_limit < math.inf):
        raise ConfigError(
            f"time_limit {c.time_limit} must be a positive number of minutes (e.g. 15)"
        )
    if c.promote_share is not None and not 0.0 <= c.promote_share < 1.0:
        raise ConfigError(f"promote_share {c.promote_share} must be in [0, 1) (e.g. "
                          "0.25 of the run's fine-tune effort; 0 turns promotions off)")
    if c.promote_factor < 2:
        raise ConfigError(f"promote_factor {c.promote_factor} must be >= 2 (e.g. 4: "
                          "a promoted plan gets 4x the fine-tune steps)")
    if c.sensitivity_images < 16:
        raise ConfigError(f"sensitivity_images {c.sensitivity_images} must be >= 16 "
                          "(e.g. 512 validation images score each choice)")
    if c.learning_rate is not None and c.learning_rate <= 0:
        raise ConfigError(
            f"learning_rate {c.learning_rate} must be > 0 (e.g. 2e-3), or left out to "
            "let the search choose it"
        )
    if c.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {c.device!r} is unknown; use auto, cpu or cuda")


def _check_study_name(c: SearchConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", c.study):
        raise ConfigError(
            f"study name {c.study!r} may hold only letters, digits, '_', '-' and '.'"
        )
    if len(c.study) > MAX_STUDY_NAME:
        # the default storage is studies/<name>.db: file systems stop at 255 bytes
        raise ConfigError(
            f"study name is {len(c.study)} characters long; use at most "
            f"{MAX_STUDY_NAME} (e.g. {c.study[:20]!r})"
        )
