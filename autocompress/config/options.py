"""Study configuration: one dataclass whose fields are the CLI options and the YAML keys,
with the checks it runs when built and the default storage of a study.

Building one from a YAML file and the command line: ``config.files``; budgets:
``config.budgets``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress.config.budgets import Budget, parse_budget
from autocompress.errors import ConfigError

SAMPLERS = ("front", "tpe", "random", "nsga2", "gp")
FIDELITIES = ("auto", "finetune", "calibration")  # how search trials are realised
OBJECTIVES = ("accuracy", "size", "latency")
SPARSITY_SCOPES = ("layer", "global")
SIZE_METRICS = ("file", "zip")
PTQ_METHODS = ("minmax", "entropy", "percentile", "dynamic")
ACTIVATION_SCHEMES = ("asymmetric", "symmetric", "search")
# Where candidates are timed and scored (runtime/sessions.py dispatches on it).
TARGETS = ("onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda", "tensorrt",
           "executorch-xnnpack")
MAX_STUDY_NAME = 120
# numpy's RandomState (Optuna's samplers) takes seeds in [0, 2**32)
MAX_SEED = 2**32 - 1
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
    sampler: str = _opt("front", "front (default: moves around the measured front, each "
                        "fine-tune inheriting a trained relative; TPE when no move is "
                        "predicted to improve it), tpe, random, nsga2 or gp")
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
    activation_scheme: str = _opt("asymmetric", "how activations are quantized: asymmetric "
                                  "(uint8 with a zero point, ORT's fast x86 path; default), "
                                  "symmetric (int8, zero point 0) or search (the sampler "
                                  "chooses per trial)")
    prune_max: float = _opt(0.7, "largest prune ratio (default 0.7)")
    prune_step: float = _opt(0.05, "prune ratio grid step (default 0.05)")
    # unstructured L1 sparsity per layer or as one global ratio (0: off); zeros shrink a
    # zipped file, not the raw one: pair it with size_metric "zip"
    sparsity_max: float = _opt(0.0, "search unstructured L1 sparsity up to this fraction "
                               "(default 0: off; pair with --size-metric zip)")
    sparsity_step: float = _opt(0.1, "sparsity grid step (default 0.1)")
    sparsity_scope: str = _opt("layer", "layer (a ratio per layer, default) or global (one "
                               "ratio ranked across all layers)")
    # what the size objective and size budgets count: the file's bytes or its zipped bytes
    size_metric: str = _opt("file", "what the size objective and size budgets count: file "
                            "(bytes on disk, default) or zip (zipped bytes: what sparsity "
                            "saves)")
    # feature KD with a weight up to this (0: never), on these layers (empty: stage outputs)
    feature_weight_max: float = _opt(0.0, "search feature distillation on/off with a weight "
                                     "up to this (default 0: off)")
    feature_layers: tuple[str, ...] = _opt((), "layers whose outputs feature distillation "
                                           "matches (default: the model's stage outputs)")
    # PTQ as a realisation the search may choose (no fine-tune); empty: every one QAT + KD
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
    # None: chosen per study by a short probe (search/lrprobe.py)
    learning_rate: float | None = _opt(None, "fine-tune learning rate (default: chosen once "
                                       "per study by a short probe)")
    batch_size: int = _opt(64, "fine-tune batch size")
    early_stop_drop: float = _opt(0.25, "stop a fine-tune half-way when its accuracy is this "
                                  "far below the teacher's (default 0.25)")
    device: str = _opt("auto", "fine-tune device: auto, cpu or cuda")
    # torch threads for fine-tuning; 0: every CPU this process may use. One search alone on
    # a 2-core machine fine-tuned ResNet-20 (batch 64) 1.75x faster on 2 threads than on 1,
    # and a default of 1 left the second core idle for the whole search. Several workers on
    # one machine each pass their share (--train-threads 1 for two workers on 2 cores).
    train_threads: int = _opt(0, "torch threads for fine-tuning and scoring (default 0: "
                              "OMP_NUM_THREADS when set, else every CPU this process may use; "
                              "give each of several workers on one machine its share)")
    # the runtime latency is measured on: the deploy target, its threads, batch and runs
    target: str = _opt("onnxruntime-cpu", "where candidates are timed and scored: "
                       "onnxruntime-cpu (default), openvino-cpu (pip install "
                       "'autocompress[openvino]'), onnxruntime-cuda or tensorrt (NVIDIA GPU, "
                       "onnxruntime-gpu), executorch-xnnpack (a .pte program on ExecuTorch's "
                       "XNNPACK backend; pip install 'autocompress[executorch]')")
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
    # a sensitivity pass and least-damage plans solved from it; the best plans retrained
    # longer (promote_factor x the steps) with promote_share of the effort (0: none)
    guided: bool = _opt(True, "skip the sensitivity pass and the least-damage plans solved "
                        "from it")
    fidelity: str = _opt("auto", "finetune (each trial), calibration (pruned, BN re-estimated, "
                         "PTQ; the best promoted to fine-tunes) or auto (calibration when not one "
                         "fine-tune fits the time limit; default)")
    sensitivity_images: int = _opt(512, "validation images each choice is scored on in the "
                                   "sensitivity pass (default 512)")
    promote_share: float | None = _opt(None, "share of the run's fine-tune effort spent "
                                       "retraining the best plans longer (default 0.25, 0.5 "
                                       "under budgets; 0: none)")
    promote_factor: int = _opt(4, "a promoted plan gets this many times its fine-tune steps "
                               "(default 4)")
    students: tuple[str, ...] = _opt((), "another architecture (any --model spec) distilled "
                                     "from the model once per study and compressed too; "
                                     "repeatable", flag="--student", metavar="SPEC")
    student_epochs: int = _opt(10, "whole epochs each --student is distilled for (default 10; "
                               "fewer when the time limit says so, at least 1)")

    def __post_init__(self) -> None:
        self.check()

    # -- checks ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise a ConfigError naming the first setting out of range (in field order)."""
        self._check_search()
        self._check_space()
        self._check_task()
        self._check_training()
        self._check_run()
        self._check_study_name()
        self._check_storage()

    def _check_search(self) -> None:
        for budget in self.budgets:
            parse_budget(budget)
        if self.trials < 1:
            raise ConfigError(f"trials {self.trials} must be at least 1 (--trials 20)")
        for name, allowed in (("sampler", SAMPLERS), ("fidelity", FIDELITIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is unknown; use one of "
                                  f"{list(allowed)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed {self.seed} must be a whole number from 0 to {MAX_SEED} "
                              "(e.g. --seed 0)")
        if self.startup_trials is not None and self.startup_trials < 1:
            raise ConfigError(
                f"startup_trials {self.startup_trials} must be >= 1 (or left out for trials // 3)"
            )
        if not self.objectives or any(o not in OBJECTIVES for o in self.objectives):
            raise ConfigError(
                f"objectives {','.join(self.objectives)!r} invalid; use a comma list of "
                f"{list(OBJECTIVES)} starting with accuracy, e.g. accuracy,size,latency"
            )
        if self.objectives[0] != "accuracy" or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(
                "objectives must start with accuracy and not repeat, e.g. accuracy,size"
            )

    def _check_space(self) -> None:
        for b in self.bits:
            if b not in (32, 8, 4):
                raise ConfigError(f"bits value {b} is unsupported; use values from 32, 8, 4")
        if not self.bits:
            raise ConfigError("bits is empty: the search space has nothing to choose from")
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError(f"bits {','.join(map(str, self.bits))} repeats a width; name each "
                              "of 32, 8, 4 at most once (e.g. --bits 8,4)")
        if not self.activation_bits or any(a not in (8, 32) for a in self.activation_bits) or (
                len(set(self.activation_bits)) != len(self.activation_bits)):
            raise ConfigError(
                f"activation_bits {list(self.activation_bits)} is invalid; use 8 (uint8 "
                "activations), 32 (weight-only) or both: 8,32"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ConfigError(f"activation_scheme {self.activation_scheme!r} is unknown; use "
                              f"one of {list(ACTIVATION_SCHEMES)}")
        if not 0.0 <= self.prune_max < 1.0:
            raise ConfigError(f"prune_max {self.prune_max} must be in [0, 1) (e.g. 0.7)")
        if not 0 < self.prune_step < 1:
            raise ConfigError(f"prune_step {self.prune_step} must be in (0, 1) (e.g. 0.05)")
        if not 0.0 <= self.sparsity_max < 1.0:
            raise ConfigError(f"sparsity_max {self.sparsity_max} must be in [0, 1) (e.g. 0.8; "
                              "0 turns unstructured sparsity off)")
        if not 0 < self.sparsity_step < 1:
            raise ConfigError(f"sparsity_step {self.sparsity_step} must be in (0, 1) (e.g. 0.1)")
        for key, value, allowed in (("sparsity_scope", self.sparsity_scope, SPARSITY_SCOPES),
                                    ("size_metric", self.size_metric, SIZE_METRICS)):
            if value not in allowed:
                raise ConfigError(f"{key} {value!r} is unknown; use one of {list(allowed)}")

    def _check_task(self) -> None:
        if (self.mean is None) != (self.std is None) or (
                self.std is not None and (len(self.std) != len(self.mean or ())
                                       or min(self.std, default=1.0) <= 0)):
            raise ConfigError("mean and std go together, one value per input channel each, "
                              "std > 0 (e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
        if self.task is not None and any(v is not None for v in (self.model, self.data,
                                                                 self.weights)):
            raise ConfigError(f"task {self.task!r} brings its own model and data; drop model, "
                              "weights and data")
        if self.weights is not None and self.model is None and self.task is None:
            # without a model spec the demo would be built and the weights never read
            raise ConfigError(f"weights {self.weights!r} need the model they belong to: add "
                              "--model (e.g. --model torchvision:resnet18 --weights FILE)")
        if self.target not in TARGETS:
            raise ConfigError(f"target {self.target!r} is unknown; use one of {list(TARGETS)}")
        if self.target == "executorch-xnnpack" and self.activation_scheme != "asymmetric":
            # XNNPACK's quantizer picks its int8 activations' zero points itself
            raise ConfigError(f"activation_scheme {self.activation_scheme!r} has no effect on "
                              "the executorch-xnnpack target (XNNPACK sets its own int8 "
                              "activation scheme); drop --activation-scheme or use another "
                              "--target")

    def _check_training(self) -> None:
        if not 0.0 <= self.feature_weight_max <= 100.0:
            raise ConfigError(f"feature_weight_max {self.feature_weight_max} must be in "
                              "[0, 100] (e.g. 1; 0 turns feature distillation off)")
        bad = [m for m in self.ptq_methods if m not in PTQ_METHODS]
        if bad or len(set(self.ptq_methods)) != len(self.ptq_methods):
            raise ConfigError(f"ptq_methods {list(self.ptq_methods)} is invalid; use any of "
                              f"{list(PTQ_METHODS)} once each, or none")
        if self.early_stop_drop is not None and not 0 < self.early_stop_drop <= 1:
            raise ConfigError(
                f"early_stop_drop {self.early_stop_drop} must be in (0, 1] (e.g. 0.25: stop a "
                "fine-tune whose accuracy fell 25 points below fp32's)"
            )
        if not 0 < self.kd_temperature_min <= self.kd_temperature_max:
            raise ConfigError("kd_temperature_min must be > 0 and <= kd_temperature_max")
        if not 0 <= self.kd_alpha_min <= self.kd_alpha_max <= 1:
            raise ConfigError("kd_alpha_min <= kd_alpha_max must both lie in [0, 1]")
        for name in ("finetune_steps", "batch_size", "threads", "latency_batch_size",
                     "latency_repeats", "round_to", "train_threads", "student_epochs"):
            minimum = 0 if name in ("finetune_steps", "train_threads") else 1
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= {minimum}")

    def _check_run(self) -> None:
        if self.max_rejections < 1:
            raise ConfigError(
                f"max_rejections {self.max_rejections} must be >= 1 (e.g. 50 plans rejected "
                "in a row before the search gives up)"
            )
        if self.time_limit is not None and not (0 < self.time_limit < math.inf):
            raise ConfigError(
                f"time_limit {self.time_limit} must be a positive number of minutes (e.g. 15)"
            )
        if self.promote_share is not None and not 0.0 <= self.promote_share < 1.0:
            raise ConfigError(f"promote_share {self.promote_share} must be in [0, 1) (e.g. "
                              "0.25 of the run's fine-tune effort; 0 turns promotions off)")
        if self.promote_factor < 2:
            raise ConfigError(f"promote_factor {self.promote_factor} must be >= 2 (e.g. 4: "
                              "a promoted plan gets 4x the fine-tune steps)")
        if self.sensitivity_images < 16:
            raise ConfigError(f"sensitivity_images {self.sensitivity_images} must be >= 16 "
                              "(e.g. 512 validation images score each choice)")
        if self.learning_rate is not None and not 0 < self.learning_rate < math.inf:
            raise ConfigError(  # the comparison also refuses nan
                f"learning_rate {self.learning_rate} must be a finite number > 0 (e.g. 2e-3), "
                "or left out to let the search choose it"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is unknown; use auto, cpu or cuda")

    def _check_study_name(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.study):  # not '.', '..'
            raise ConfigError(f"study name {self.study!r} must start with a letter or digit and "
                              "hold only letters, digits, '_', '-' and '.' (e.g. 'resnet20-v1')")
        if len(self.study) > MAX_STUDY_NAME:
            # the default storage is studies/<name>.db: file systems stop at 255 bytes
            raise ConfigError(
                f"study name is {len(self.study)} characters long; use at most "
                f"{MAX_STUDY_NAME} (e.g. {self.study[:20]!r})"
            )

    def _check_storage(self) -> None:
        for key, value, default in (("storage", self.storage, self.storage_url()),
                                    ("artifacts", self.artifacts, "beside the SQLite file")):
            if value is not None and not value.strip():
                raise ConfigError(f"{key} is empty; pass a value or leave --{key} out for the "
                                  f"default ({default})")
        if self.artifacts is None or self.artifacts.startswith("s3:"):
            return
        blocker = _file_in_the_way(Path(self.artifacts))
        if blocker is not None:
            raise ConfigError(f"artifacts folder {self.artifacts!r} cannot be made: {blocker} "
                              "is a file; pass --artifacts a folder path (e.g. "
                              f"studies/{self.study}-artifacts)")

    # -- derived --------------------------------------------------------------------

    def sampler_startup_trials(self) -> int:
        """Random trials before TPE/GP start modelling. Optuna's fixed 10 would leave a short
        search (--trials 6) random from start to end, so by default a third of the trials,
        between 2 and 10."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(2, min(10, self.trials // 3))

    def fine_tune_threads(self) -> int:
        """``train_threads`` with 0 (the default) resolved: ``OMP_NUM_THREADS`` when set (as
        torch itself reads it), else the CPUs this process may use."""
        if self.train_threads:
            return self.train_threads
        omp = os.environ.get("OMP_NUM_THREADS", "")
        return int(omp) if omp.isdigit() and int(omp) > 0 else available_cpus()

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


def _file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at ``folder`` or at its nearest existing parent, if any."""
    for path in (folder, *folder.absolute().parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


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
    "SearchConfig",
    "available_cpus",
    "config_keys",
    "default_storage_url",
]
