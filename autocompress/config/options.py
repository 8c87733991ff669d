"""Study configuration: one dataclass whose fields are the CLI options and the YAML keys.

Precedence: built-in defaults < YAML file (``--config``) < command line. Unknown keys and
values of the wrong type are ``ConfigError`` naming the key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress.config.budgets import Budget, format_bytes, parse_budget
from autocompress.config.checks import (
    MAX_STUDY_NAME,
    OBJECTIVES,
    PTQ_METHODS,
    SAMPLERS,
    SIZE_METRICS,
    SPARSITY_SCOPES,
    TARGETS,
    check_config,
)
from autocompress.config.files import coerce, read_config_file
from autocompress.errors import ConfigError

# default share of a run's fine-tune effort spent on promotions (SearchConfig.promotion_share)
PROMOTE_SHARE = 0.25
PROMOTE_SHARE_UNDER_BUDGETS = 0.5
# Where a study lives when no --storage is given: one SQLite file per study in this folder.
DEFAULT_STUDIES_DIR = "studies"
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_STUDIES_DIR}/{{study}}.db"


def default_storage_url(study: str) -> str:
    """Where a study lives when no --storage is given: one SQLite file per study."""
    return DEFAULT_STORAGE.format(study=study)


def _opt(default: Any, help: str, group: str = "search", **cli: Any) -> Any:
    """A SearchConfig field with its command-line help (``group``: which commands share it;
    ``cli``: argparse extras such as ``flag`` or ``metavar``). The CLI flags, the YAML keys
    and the options reference in docs/cli.md all come from these fields."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs. Field names are the YAML keys; CLI flags use dashes."""

    # what to compress
    model: str | None = _opt(None, "torchvision:NAME, timm:NAME, hf:MODEL_DIR (transformers "
                             "text classifier), path/file.py:factory, package.module:factory, "
                             "or demo", "model")
    weights: str | None = _opt(None, "state_dict or checkpoint file (loaded weights_only)",
                               "model")
    data: str | None = _opt(None, "digits, imagefolder:ROOT, cifar10:ROOT, text:FILE.csv"
                            "[?text=COL&label=COL&max_length=N] or package.module:factory",
                            "model")
    num_classes: int | None = _opt(None, "classifier outputs (default: the data's)", "model")
    input_size: int | None = _opt(None, "square input side in pixels", "model")
    # a user's task factory (file.py:factory) giving model, data, metric and loss at once
    task: str | None = _opt(None, "file.py:factory or package.module:factory returning your "
                            "model, data, metric and loss (instead of --model/--data)", "task")
    # input normalisation (per channel); None: the train split's own statistics
    mean: tuple[float, ...] | None = _opt(None, "per-channel input mean, e.g. "
                                          "0.485,0.456,0.406 (default: the train split's)",
                                          "task")
    std: tuple[float, ...] | None = _opt(None, "per-channel input std, with --mean", "task")
    # where the study lives
    study: str = _opt("demo", "study name (default: demo)", "storage")
    storage: str | None = _opt(None, "database URL (default: "
                               f"{DEFAULT_STORAGE.format(study='<study>')}; "
                               "postgresql://user:pw@host/db for several workers)", "storage")
    artifacts: str | None = _opt(None, "artifact folder shared by all workers, or "
                                 "s3://bucket/prefix (needs boto3; default: beside the SQLite "
                                 "file)", "storage")
    # what to optimise and under which limits
    budgets: tuple[str, ...] = _opt((), "latency (50ms, 0.05s, 500us, or 0.6x: a share of "
                                    "the fp32 model's on this machine) or size (8MB, "
                                    "512KiB); repeatable", flag="--budget", metavar="LIMIT")
    objectives: tuple[str, ...] = _opt(("accuracy", "size"), "accuracy,size (default) or "
                                       "accuracy,size,latency")
    trials: int = _opt(20, "search trials this run adds (default 20)")
    sampler: str = _opt("tpe", "tpe (default), random, nsga2 or gp")
    # random trials before the TPE/GP model; None: trials // 3
    startup_trials: int | None = _opt(None, "random trials before TPE/GP model the results "
                                      "(default trials // 3, 2..10)")
    seed: int = _opt(0, "seed for the sampler, splits and fine-tune")
    # the space
    bits: tuple[int, ...] = _opt((32, 8, 4), "weight widths to search (default 32,8,4)")
    # activations of quantized layers: 8 (uint8, integer kernels) and/or 32 (weight-only)
    activation_bits: tuple[int, ...] = _opt((8, 32), "activations of quantized layers: 8 "
                                            "(uint8, integer kernels), 32 (weight-only: float "
                                            "activations, integer weights in the file) or both "
                                            "(default 8,32)")
    prune_max: float = _opt(0.7, "largest prune ratio (default 0.7)")
    prune_step: float = _opt(0.05, "prune ratio grid step (default 0.05)")
    # unstructured L1 sparsity searched up to this fraction, per layer ("layer") or as one
    # ratio ranked across all layers ("global"); 0: not searched. Zeros shrink a zipped file
    # (or a sparse format), not the raw one: pair it with size_metric "zip"
    sparsity_max: float = _opt(0.0, "search unstructured L1 sparsity up to this fraction "
                               "(default 0: off; pair with --size-metric zip)")
    sparsity_step: float = _opt(0.1, "sparsity grid step (default 0.1)")
    sparsity_scope: str = _opt("layer", "layer (a ratio per layer, default) or global (one "
                               "ratio ranked across all layers)")
    # what the size objective and size budgets count: the file's bytes or its zipped bytes
    size_metric: str = _opt("file", "what the size objective and size budgets count: file "
                            "(bytes on disk, default) or zip (zipped bytes: what sparsity "
                            "saves)")
    # feature distillation searched on/off with a weight up to this (0: never); the layers
    # whose outputs are matched (student and teacher share names; empty: stage outputs)
    feature_weight_max: float = _opt(0.0, "search feature distillation on/off with a weight "
                                     "up to this (default 0: off)")
    feature_layers: tuple[str, ...] = _opt((), "layers whose outputs feature distillation "
                                           "matches (default: the model's stage outputs)")
    # post-training quantization as a realisation the search may choose (no fine-tune),
    # calibrated with one of these methods; empty: every candidate is QAT + KD
    ptq_methods: tuple[str, ...] = _opt((), "let the search realise a plan by post-training "
                                        "quantization (no fine-tune) calibrated with these: "
                                        "minmax, entropy, percentile, or dynamic (int8 "
                                        "MatMul/Conv quantized at run time, the guide's "
                                        "recipe for Transformers; default: none, every plan "
                                        "is QAT + KD)")
    kd_temperature_min: float = _opt(1.0, "lowest distillation temperature searched "
                                     "(default 1)")
    kd_temperature_max: float = _opt(10.0, "highest (default 10)")
    kd_alpha_min: float = _opt(0.5, "lowest distillation weight searched (default 0.5; the "
                               "rest is cross-entropy on the labels)")
    kd_alpha_max: float = _opt(1.0, "highest (default 1)")
    round_to: int = _opt(8, "pruned channel counts kept at multiples of this (default 8)")
    # the fine-tune each candidate gets
    finetune_steps: int = _opt(150, "QAT+KD steps per candidate")
    # None: chosen per study by a short probe (lrprobe)
    learning_rate: float | None = _opt(None, "fine-tune learning rate (default: chosen once "
                                       "per study by a short probe)")
    batch_size: int = _opt(64, "fine-tune batch size")
    early_stop_drop: float = _opt(0.25, "stop a fine-tune half-way when its accuracy is this "
                                  "far below the teacher's (default 0.25)")
    device: str = _opt("auto", "fine-tune device: auto, cpu or cuda")
    # torch threads for fine-tuning; 1 is fastest for small models
    train_threads: int = _opt(1, "torch threads for fine-tuning (default 1)")
    # the runtime latency is measured on: the deploy target, its threads, batch and runs
    target: str = _opt("onnxruntime-cpu", "where candidates are timed and scored: "
                       "onnxruntime-cpu (default), openvino-cpu (pip install "
                       "'autocompress[openvino]'), onnxruntime-cuda or tensorrt (NVIDIA GPU, "
                       "onnxruntime-gpu)")
    threads: int = _opt(1, "ONNX Runtime intra-op threads for latency")
    latency_batch_size: int = _opt(1, "batch size latency is measured at")
    latency_repeats: int = _opt(30, "timed runs per latency measurement")
    baselines: bool = _opt(True, "do not record the fp32, int8 PTQ and int8 dynamic baselines")
    # uniform int8 / int4 QAT + KD as the first search trials
    warm_starts: bool = _opt(True, "do not start the search from uniform int8/int4 QAT + KD "
                             "trials")
    # when to give up: rejected plans in a row, and minutes of wall time (None: no limit)
    max_rejections: int = _opt(50, "end the run after this many plans in a row are rejected "
                               "at the pre-check (default 50; rejections never count in "
                               "--trials)")
    time_limit: float | None = _opt(None, "end the run between trials after this many minutes "
                                    "(the study can be resumed)", metavar="MINUTES")
    # search intelligence: a sensitivity pass and least-damage plans solved from it, queued
    # after the warm starts; the best plans retrained longer (promote_factor x the steps)
    # with promote_share of the run's fine-tune effort (0: no promotions)
    guided: bool = _opt(True, "skip the sensitivity pass and the least-damage plans solved "
                        "from it")
    sensitivity_images: int = _opt(512, "validation images each choice is scored on in the "
                                   "sensitivity pass (default 512)")
    promote_share: float | None = _opt(None, "share of the run's fine-tune effort spent "
                                       "retraining the best plans longer (default 0.25, 0.5 "
                                       "under budgets; 0: none)")
    promote_factor: int = _opt(4, "a promoted plan gets this many times its fine-tune steps "
                               "(default 4)")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a ConfigError naming the first setting out of range (``checks``)."""
        check_config(self)

    # -- derived --------------------------------------------------------------------

    def sampler_startup_trials(self) -> int:
        """Random trials before TPE/GP start modelling. Optuna's fixed 10 would leave a short
        search (--trials 6) random from start to end, so by default a third of the trials,
        between 2 and 10."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(2, min(10, self.trials // 3))

    def promotion_share(self) -> float:
        """``promote_share``, or by default 0.25, and 0.5 under budgets: there the deliverable
        is the one most accurate plan within them (``export --best``), and a longer fine-tune
        of the best plans gains more than more short trials (ResNet-20 at 0.6x fp32 latency:
        +3.7 points of accuracy from 150 to 600 steps, where the search's later short trials
        came out 3-6 points below the best)."""
        if self.promote_share is not None:
            return self.promote_share
        return PROMOTE_SHARE_UNDER_BUDGETS if self.budgets else PROMOTE_SHARE

    def parsed_budgets(self) -> list[Budget]:
        return [parse_budget(b) for b in self.budgets]

    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.study)

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        items = dataclasses.asdict(self).items()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SearchConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SearchConfig)}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML study config into checked keyword arguments for SearchConfig."""
    return read_config_file(path, _field_types())


def build_config(config_file: str | Path | None, overrides: dict[str, Any]) -> SearchConfig:
    """Defaults < file < overrides (overrides whose value is None are not given)."""
    values: dict[str, Any] = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SearchConfig(**values)
    except TypeError as exc:  # a key that slipped past the checks above
        raise ConfigError(f"bad config: {exc}") from None


def config_from_stored(values: dict[str, Any], **overrides: Any) -> SearchConfig:
    """The SearchConfig a study recorded (its ``config`` attribute), with ``overrides``.
    Keys this version does not know (a study written by another one) are left out."""
    hints = _field_types()
    checked = {k: coerce(k, v, hints[k]) for k, v in values.items() if k in hints}
    checked.update(overrides)
    try:
        return SearchConfig(**checked)
    except TypeError as exc:
        raise ConfigError(f"the study's stored config is unreadable: {exc}") from None


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(SearchConfig)]


__all__ = [
    "DEFAULT_STORAGE",
    "DEFAULT_STUDIES_DIR",
    "MAX_STUDY_NAME",
    "OBJECTIVES",
    "PTQ_METHODS",
    "SAMPLERS",
    "SIZE_METRICS",
    "SPARSITY_SCOPES",
    "TARGETS",
    "Budget",
    "SearchConfig",
    "build_config",
    "config_from_stored",
    "config_keys",
    "default_storage_url",
    "format_bytes",
    "load_config_file",
    "parse_budget",
]
