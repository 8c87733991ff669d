"""The narrow settings each stage takes: built once from a SearchConfig, same values."""

from __future__ import annotations

import dataclasses
import os

import pytest

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.model.inventory import Inventory, LayerInfo, PruneGroup
from autocompress.model.space import space_description, uniform_plan

CONFIG = SearchConfig(bits=(8, 4), prune_max=0.5, sparsity_max=0.4, ptq_methods=("minmax",),
                      finetune_steps=40, batch_size=16, threads=2, latency_repeats=10,
                      train_threads=3, trials=9, time_limit=3.0, promote_factor=3, budgets=("5ms",))


def test_every_copied_field_keeps_the_options_value() -> None:
    settings = SearchSettings.from_config(CONFIG)
    for part in (settings.space, settings.training, settings.measurement, settings.run):
        for field in dataclasses.fields(part):
            assert getattr(part, field.name) == getattr(CONFIG, field.name), field.name


def test_train_threads_zero_means_every_cpu_this_process_may_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert SearchConfig().train_threads == 0  # the default
    settings = SearchSettings.from_config(SearchConfig())
    assert settings.training.train_threads == settings.measurement.train_threads == 3
    assert SearchConfig(train_threads=2).fine_tune_threads() == 2  # an explicit count stays
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as torch reads it
    assert SearchConfig().fine_tune_threads() == 2


def test_derived_promotion_settings() -> None:
    promotion = SearchSettings.from_config(CONFIG).promotion
    assert promotion.share == CONFIG.promotion_share() == 0.5
    assert (promotion.factor, promotion.finetune_steps, promotion.under_budgets) == (3, 40, True)
    assert not SearchSettings.from_config(SearchConfig()).promotion.under_budgets


def test_settings_are_frozen_and_the_learning_rate_is_set_once() -> None:
    settings = SearchSettings.from_config(CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.space.bits = (8,)  # type: ignore[misc]
    rated = settings.with_learning_rate(3e-4)
    assert rated.space.learning_rate == 3e-4 and settings.space.learning_rate is None
    assert rated.training == settings.training


def test_the_space_reads_the_same_from_settings_as_from_the_config() -> None:
    inventory = Inventory([LayerInfo("conv", "Conv2d", 288, 18432, [1, 32, 8, 8], True, None)],
                          [PruneGroup("conv", ["conv"], 32, True, None)])
    space = SearchSettings.from_config(CONFIG).space
    assert space_description(inventory, space) == space_description(inventory, CONFIG)
    assert uniform_plan(inventory, space, bits=8) == uniform_plan(inventory, CONFIG, bits=8)
