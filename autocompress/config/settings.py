"""The narrow settings each stage of a search reads, built once from a ``SearchConfig``.

A stage takes only the settings it reads (the search space, a candidate's build and
fine-tune, its measurement, the run's limits, the promotions), so what can change its result
shows in its signature and a lower layer never sees the whole config. The search's entry
(``search/session.py:open_session``) builds them with ``SearchSettings.from_config``; the
learning rate, chosen once per study by a probe, is set on them afterwards
(``with_learning_rate``). A field that copies an option keeps the option's name and value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from autocompress.config.options import SearchConfig


@dataclass(frozen=True)
class SpaceSettings:
    """What the search space reads (``model/space.py``, and the planners that make plans of
    it): the choices, their grids and ranges, and what every plan carries."""

    bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    prune_max: float
    prune_step: float
    sparsity_max: float
    sparsity_step: float
    sparsity_scope: str
    size_metric: str  # part of the space's description (a study's resume check)
    feature_weight_max: float
    feature_layers: tuple[str, ...]
    ptq_methods: tuple[str, ...]
    kd_temperature_min: float
    kd_temperature_max: float
    kd_alpha_min: float
    kd_alpha_max: float
    finetune_steps: int
    learning_rate: float | None  # None until the search's probe chose one
    # asymmetric (uint8), symmetric (int8, zero point 0) or search (the sampler's choice)
    activation_scheme: str = "asymmetric"


@dataclass(frozen=True)
class TrainingSettings:
    """How a candidate is built and fine-tuned (a trial's fine-tune, the learning-rate probe,
    the sensitivity pass)."""

    round_to: int
    batch_size: int
    seed: int
    early_stop_drop: float
    device: str
    train_threads: int


@dataclass(frozen=True)
class MeasurementSettings:
    """Where and how a candidate is timed and scored, and what a trial returns."""

    target: str
    threads: int
    latency_batch_size: int
    latency_repeats: int
    # scoring accuracy is throughput work, not a timing: it may use the fine-tune's threads
    train_threads: int
    size_metric: str
    objectives: tuple[str, ...]


@dataclass(frozen=True)
class RunSettings:
    """What one run of the search does and may spend (``search/loop.py``)."""

    study: str
    trials: int
    max_rejections: int
    time_limit: float | None
    baselines: bool
    warm_starts: bool
    guided: bool
    sensitivity_images: int
    sampler: str = "front"  # "front": the search proposes from the measured front
    fidelity: str = "auto"  # how search trials are realised (search/fidelity.py)
    students: tuple[str, ...] = ()  # --student specs distilled and compressed beside it
    student_epochs: int = 10  # whole epochs each student is distilled for (search/students.py)


@dataclass(frozen=True)
class PromotionSettings:
    """What the promotions read (``search/promotion.py``)."""

    share: float  # of the run's fine-tune effort (``SearchConfig.promotion_share``)
    factor: int  # ``promote_factor``
    finetune_steps: int  # a short fine-tune's steps: the unit of the effort
    under_budgets: bool  # the study has budgets: the most accurate plan within them first


@dataclass(frozen=True)
class SearchSettings:
    """Every stage's settings of one search."""

    space: SpaceSettings
    training: TrainingSettings
    measurement: MeasurementSettings
    run: RunSettings
    promotion: PromotionSettings

    @classmethod
    def from_config(cls, config: SearchConfig) -> SearchSettings:
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        options["train_threads"] = config.fine_tune_threads()  # 0: every CPU, resolved here
        return cls(
            space=_picked(SpaceSettings, options),
            training=_picked(TrainingSettings, options),
            measurement=_picked(MeasurementSettings, options),
            run=_picked(RunSettings, options),
            promotion=PromotionSettings(
                share=config.promotion_share(),
                factor=config.promote_factor,
                finetune_steps=config.finetune_steps,
                under_budgets=bool(config.budgets),
            ),
        )

    def with_learning_rate(self, rate: float) -> SearchSettings:
        """These settings with the fine-tune learning rate every plan carries set."""
        return dataclasses.replace(
            self, space=dataclasses.replace(self.space, learning_rate=rate))


_S = TypeVar("_S")


def _picked(cls: type[_S], options: dict[str, Any]) -> _S:
    """``cls`` with each field set to the option of the same name."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return cls(**{f.name: options[f.name] for f in fields})


__all__ = [
    "MeasurementSettings",
    "PromotionSettings",
    "RunSettings",
    "SearchSettings",
    "SpaceSettings",
    "TrainingSettings",
]
