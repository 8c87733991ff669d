"""The sensitivity pass on the digits demo: a layer made fragile on purpose ranks first."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from autocompress.config.options import SearchConfig
from autocompress.config.settings import SearchSettings
from autocompress.intake import Task
from autocompress.search.sensitivity import Sensitivity, measure_sensitivity, prune_grid
from autocompress.transform.survey import build_inventory

FRAGILE = "block1.conv2"
OUTLIER = 1000.0


def _calibration(task: Task) -> list[torch.Tensor]:
    return [x for x, _ in task.data.batches("train", 32, shuffle=True, seed=0)][:4]


def _fragile_task(task: Task) -> Task:
    """The same function, but block1.conv2's weights for input channel 0 are 1000x larger
    (its input is 1000x smaller: bn1's scale and shift for that channel divided, through a
    ReLU, which is positively homogeneous). Per output channel the outlier sets the
    quantization scale, so every other weight of the layer rounds to zero at 4 bits."""
    model = copy.deepcopy(task.model)
    with torch.no_grad():
        model.block1.bn1.weight[0] /= OUTLIER
        model.block1.bn1.bias[0] /= OUTLIER
        model.block1.conv2.weight[:, 0] *= OUTLIER
    x = task.data.example_input(8)
    assert torch.allclose(model(x), task.model(x), atol=1e-3)  # same teacher function
    return dataclasses.replace(task, model=model.eval())


@pytest.fixture(scope="module")
def fragile_table(demo_task: Task) -> Sensitivity:
    task = _fragile_task(demo_task)
    inventory = build_inventory(task.model, task.data.example_input(1))
    settings = SearchSettings.from_config(SearchConfig(prune_max=0.5))
    return measure_sensitivity(task, inventory, settings.space, _calibration(task),
                               training=settings.training, images=128)


def test_fragile_layer_ranks_first_at_int4(fragile_table: Sensitivity) -> None:
    ranked = fragile_table.ranked_layers(4)
    assert ranked[0][0] == FRAGILE
    # and by a wide margin: the others barely move at int4
    assert ranked[0][1] > 10 * ranked[1][1]
    assert fragile_table.fragile_layers(4) == [FRAGILE]
    assert fragile_table.layers[FRAGILE]["bits"]["4"]["accuracy"] < 0.5


def test_table_covers_every_choice_and_round_trips(fragile_table: Sensitivity) -> None:
    assert set(fragile_table.layers) == {"conv1", "block1.conv1", "block1.conv2",
                                         "down_conv", "block2.conv1", "block2.conv2", "fc"}
    for entry in fragile_table.layers.values():
        assert set(entry["bits"]) == {"8", "4"}
        assert entry["params"] > 0 and entry["macs"] > 0
    assert fragile_table.images == 128
    assert set(fragile_table.groups)  # the demo CNN has prunable groups
    for group in fragile_table.groups.values():
        assert list(group["ratios"]) == ["0.2", "0.4"]  # PRUNE_GRID within prune_max 0.5
        for entry in group["ratios"].values():
            assert entry["kept"]  # pruning a group removes weights somewhere
            assert all(0 < share < 1 for share in entry["kept"].values())
    again = Sensitivity.from_dict(fragile_table.to_dict())
    assert again.ranked_layers(4) == fragile_table.ranked_layers(4)


def test_more_pruning_does_more_damage(fragile_table: Sensitivity) -> None:
    # On average over groups: single groups can tie when rounding keeps the same channels.
    mild = sum(g["ratios"]["0.2"]["kl"] for g in fragile_table.groups.values())
    hard = sum(g["ratios"]["0.4"]["kl"] for g in fragile_table.groups.values())
    assert hard > mild


def test_prune_grid_follows_the_space() -> None:
    def grid(prune_max: float) -> list[float]:
        return prune_grid(SearchSettings.from_config(SearchConfig(prune_max=prune_max)).space)

    assert grid(0.7) == [0.2, 0.4, 0.6]
    assert grid(0.1) == [0.1]
    assert grid(0.0) == []


def test_a_choice_that_cannot_be_scored_is_left_out_not_fatal(
    demo_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress.search import sensitivity

    real = sensitivity.quantize.prepare_qat

    def broken(model: torch.nn.Module, plan: object) -> torch.nn.Module:
        if "fc" in plan.bits:  # type: ignore[attr-defined]
            raise RuntimeError("no kernel for this layer")
        return real(model, plan)  # type: ignore[arg-type]

    monkeypatch.setattr(sensitivity.quantize, "prepare_qat", broken)
    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    table = measure_sensitivity(demo_task, inventory, SearchConfig(prune_max=0.0),
                                _calibration(demo_task), images=64)
    assert table.layers["fc"]["bits"] == {}
    assert set(table.failed) == {"fc@int8", "fc@int4"}
    assert "no kernel" in table.failed["fc@int4"]
    assert table.layers["conv1"]["bits"]  # the others were scored


def test_a_pass_out_of_time_estimates_layers_and_leaves_groups_unscored(
    demo_task: Task,
) -> None:
    """With no time at all the pass scores one choice and works with it: every other layer
    width gets the scored median (listed as estimated, so guided plans still use it), no
    group is started, all are listed as unscored; a search's bound is a tenth of its limit."""
    from autocompress.search.sensitivity import TIME_CAP_S, pass_seconds

    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    prunable = {g.name for g in inventory.groups if g.prunable}
    quantizable = [layer.name for layer in inventory.layers if layer.quantizable]
    assert len(prunable) >= 2
    table = measure_sensitivity(demo_task, inventory, SearchConfig(prune_max=0.5),
                                _calibration(demo_task), images=64, seconds=0.0)
    assert list(table.layers) == quantizable
    assert table.estimated == quantizable[1:]
    first = table.layers[quantizable[0]]["bits"]
    assert set(first) == {"8", "4"} and "estimated" not in first["8"]
    assert "estimated" not in first["4"]  # the first layer's widths: a choice is scored first
    for name in quantizable[1:]:
        assert table.layers[name]["bits"]["4"]["estimated"] is True
        assert table.layers[name]["bits"]["4"]["kl"] == first["4"]["kl"]
    assert table.groups == {} and sorted(table.unscored) == sorted(prunable)
    again = Sensitivity.from_dict(table.to_dict())
    assert again.unscored == table.unscored and again.estimated == table.estimated
    assert pass_seconds(15) == pytest.approx(90.0)
    assert pass_seconds(None) == TIME_CAP_S


def test_the_pass_stops_at_its_share_when_choices_are_slow(
    demo_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each choice made slow (a sleep): the pass stops when the next one would overrun its
    bound and keeps what it scored, instead of scoring every layer and a group past it."""
    import time

    from autocompress.search import sensitivity

    real = sensitivity._score
    step = 0.05

    def slow(*args: object, **kwargs: object) -> tuple[float, float]:
        time.sleep(step)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sensitivity, "_score", slow)
    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    bound = 0.4
    started = time.perf_counter()
    table = measure_sensitivity(demo_task, inventory, SearchConfig(prune_max=0.5),
                                _calibration(demo_task), images=64, seconds=bound)
    took = time.perf_counter() - started
    # slack for one real choice on a loaded 2-core box (two test workers); scoring every
    # choice, as an unbounded pass does, takes several times the bound (checked below too)
    assert took <= bound + 2 * step + 0.5 and table.seconds <= bound + 2 * step + 0.5
    scored = sum(1 for e in table.layers.values() for b in e["bits"].values()
                 if not b.get("estimated"))
    assert 1 <= scored < 2 * len(table.layers) and table.estimated
    assert table.unscored
    roomy = measure_sensitivity(demo_task, inventory, SearchConfig(prune_max=0.5),
                                _calibration(demo_task), images=64, seconds=3600.0)
    assert not roomy.estimated and not roomy.unscored


def test_layers_that_would_overrun_the_pass_are_scored_on_fewer_images(
    demo_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer is scored; when the first choice shows the layers would take more than
    their share of the bound, every choice is scored on a shorter (shared) slice; with time
    to spare the slice is the one asked for."""
    from autocompress.search.sensitivity import CALIBRATION_BATCHES, MIN_IMAGES

    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    quantizable = {layer.name for layer in inventory.layers if layer.quantizable}
    config = SearchConfig(prune_max=0.0)
    from autocompress.transform import quantize

    real_calibrate = quantize.calibrate
    asked: list[int] = []

    def recorded(model: object, batches: object, *, max_batches: int = 8) -> object:
        asked.append(max_batches)
        return real_calibrate(model, batches, max_batches=max_batches)  # type: ignore[arg-type]

    monkeypatch.setattr(quantize, "calibrate", recorded)
    tight = measure_sensitivity(demo_task, inventory, config, _calibration(demo_task),
                                images=256, seconds=1e-3)
    # after the one timed choice, every choice's observers were set on one batch
    assert asked[0] == CALIBRATION_BATCHES and set(asked[1:]) == {1}
    assert tight.images == MIN_IMAGES
    assert set(tight.layers) == quantizable
    assert all(entry["bits"] for entry in tight.layers.values())
    # the copy and calibration alone overran: the observers saw one batch, not four
    assert tight.calibration_batches == 1
    assert Sensitivity.from_dict(tight.to_dict()).calibration_batches == 1
    roomy = measure_sensitivity(demo_task, inventory, config, _calibration(demo_task),
                                images=256, seconds=3600.0)
    assert roomy.images == 256
    assert roomy.calibration_batches == CALIBRATION_BATCHES


def test_a_first_choice_that_cannot_be_scored_does_not_end_a_bounded_pass(
    demo_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing the first choice must not raise where scoring it would be recorded as failed."""
    from autocompress.search import sensitivity

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for this width")

    monkeypatch.setattr(sensitivity.quantize, "prepare_qat", broken)
    inventory = build_inventory(demo_task.model, demo_task.data.example_input(1))
    table = measure_sensitivity(demo_task, inventory, SearchConfig(prune_max=0.0),
                                _calibration(demo_task), images=64, seconds=1e-3)
    quantizable = [layer.name for layer in inventory.layers if layer.quantizable]
    assert set(table.failed) == {f"{n}@int{b}" for n in quantizable for b in (8, 4)}


def test_the_printed_table_marks_estimated_layers(capsys: pytest.CaptureFixture[str]) -> None:
    from autocompress.results.tables import print_sensitivity

    table = Sensitivity(images=64, seconds=1.0, teacher_accuracy=0.99, layers={
        "conv1": {"params": 100, "bits": {"4": {"kl": 0.5, "accuracy": 0.9}}},
        "conv2": {"params": 100, "bits": {"4": {"kl": 0.25, "accuracy": 0.95,
                                                "estimated": True}}},
    }, estimated=["conv2"])
    print_sensitivity(table)
    out = capsys.readouterr().out
    assert "~0.25" in out and "~0.9500" in out and "~0.5" not in out
    assert "~ estimated, not measured (1 layers" in out


def test_groups_the_pass_had_no_time_for_get_the_scored_groups_median() -> None:
    """A group left unscored is still priced (else no guided plan or proposal can prune it,
    and under a latency budget that needs pruning nothing could be planned): the scored
    groups' median KL at each ratio, its members' outputs cut by the ratio, marked."""
    from autocompress.model.inventory import PruneGroup
    from autocompress.search.group_estimates import estimate_groups

    table = Sensitivity(images=10, seconds=1.0, teacher_accuracy=0.9)
    for name, kl in (("big", 0.3), ("mid", 0.1), ("odd", 0.2)):
        table.groups[name] = {"ratios": {"0.2": {"kl": kl, "accuracy": 0.8,
                                                 "kept": {name: 0.8}}}}
    table.unscored = ["small"]
    estimate_groups(table, [PruneGroup("small", ["a.conv", "b.conv"], 8, True, None)], [0.2])
    entry = table.groups["small"]
    assert entry["estimated"] is True
    assert entry["ratios"]["0.2"]["kl"] == 0.2  # the median of 0.1, 0.2, 0.3
    assert entry["ratios"]["0.2"]["kept"] == {"a.conv": 0.8, "b.conv": 0.8}
    assert table.unscored == ["small"]  # still said to be unscored
