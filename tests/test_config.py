"""Budgets, YAML configs and the CLI override rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from autocompress.config.budgets import parse_budget
from autocompress.config.files import build_config, load_config_file
from autocompress.config.options import SearchConfig
from autocompress.errors import BudgetError, ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("50ms", "latency", 50.0),
        ("0.05s", "latency", 50.0),
        ("500us", "latency", 0.5),
        ("8MB", "size", 8e6),
        ("512KiB", "size", 512 * 1024),
        ("1.5e3KB", "size", 1.5e6),
    ],
)
def test_parse_budget(text: str, kind: str, value: float) -> None:
    budget = parse_budget(text)
    assert budget.kind == kind
    assert budget.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["fast", "0ms", "-3ms", "12parsecs", "ms", "1.2x", "0x"])
def test_bad_budget_is_one_line_error(text: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)
    assert text in str(info.value)
    assert any(hint in str(info.value) for hint in ("50ms", "ms, s", "positive", "0.6x"))


def test_a_share_of_fp32_latency_is_resolved_against_the_reference() -> None:
    budget = parse_budget("0.6x")
    assert budget.kind == "latency" and budget.relative and budget.value == 0.6
    with pytest.raises(ValueError, match="resolve"):
        budget.violation(1.0, 0.0)
    ms = budget.resolve(1.25)
    assert not ms.relative and ms.value == pytest.approx(0.75) and ms.text == "0.6x"
    assert ms.violation(0.75 * 1.1, 0.0) == pytest.approx(0.1)
    assert "0.6x of fp32 = 0.75 ms" in ms.describe(0.8, 0.0)
    assert type(ms).from_dict(budget.to_dict()) == budget  # the relative flag round-trips
    assert parse_budget("8MB").resolve(1.25) == parse_budget("8MB")


def test_violation_is_relative() -> None:
    budget = parse_budget("2ms")
    assert budget.violation(1.0, 0) == pytest.approx(-0.5)
    assert budget.violation(3.0, 0) == pytest.approx(0.5)


def test_shipped_configs_load() -> None:
    for name in ("demo.yaml", "cifar10-resnet20.yaml"):
        values = load_config_file(REPO / "studies" / name)
        SearchConfig(**values)


def test_command_line_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("trials: 7\nsampler: random\nbudget: 3ms\nbits: [8, 4]\n")
    config = build_config(path, {"trials": 3, "sampler": None})
    assert config.trials == 3 and config.sampler == "random"
    assert config.budgets == ("3ms",) and config.bits == (8, 4)


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("trails: 5\n", "unknown config key 'trails'"),
        ("trials: many\n", "'trials' must be an integer"),
        ("prune_max: yes\n", "'prune_max' must be a number"),
        ("bits: 8\n", "'bits' must be a list"),
        ("- a\n- b\n", "must be a mapping"),
        ("trials: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        build_config(path, {})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"trials": 0}, "trials 0"),
        ({"sampler": "bayes"}, "sampler 'bayes'"),
        ({"startup_trials": 0}, "startup_trials 0"),
        ({"objectives": ("size",)}, "objectives"),
        ({"bits": (3,)}, "bits value 3"),
        ({"bits": ()}, "bits is empty"),
        ({"study": "a/b"}, "study name"),
    ],
)
def test_bad_values_refused(changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        SearchConfig(**changes)
    assert needle in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("nope.yaml", {})


@pytest.mark.parametrize(("trials", "startup", "expected"),
                         [(4, None, 2), (12, None, 4), (20, None, 6), (90, None, 10), (4, 3, 3)])
def test_sampler_startup_trials_scale_with_the_search(
    trials: int, startup: int | None, expected: int
) -> None:
    config = SearchConfig(trials=trials, startup_trials=startup)
    assert config.sampler_startup_trials() == expected
