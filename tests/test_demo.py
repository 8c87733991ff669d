"""The built-in demo: trained once per cache, cached, reloaded identically, accurate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autocompress.intake import Task, demo, load_data, load_task
from autocompress.intake.demo import DemoNet, build_demo_model, demo_weights_path, load_demo_model


def _accuracy(model: torch.nn.Module, task: Task, split: str) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in task.data.batches(split, 256):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def test_demo_task_is_a_trained_eval_mode_teacher_on_digits(demo_task: Task) -> None:
    assert isinstance(demo_task.model, DemoNet) and not demo_task.model.training
    assert demo_task.model_spec == "demo" and demo_task.data_spec == "digits"
    assert demo_task.input_shape == (1, 8, 8) and demo_task.num_classes == 10
    assert _accuracy(demo_task.model, demo_task, "val") >= 0.95
    assert _accuracy(demo_task.model, demo_task, "test") >= 0.95


def test_demo_weights_were_cached_and_reload_identically(
    demo_task: Task, autocompress_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session fixture trained into a fresh cache; a second load must not train again.
    path = demo_weights_path(demo_task.data, autocompress_cache, seed=0)
    assert path.is_file() and path.name.startswith("demo-digits-")

    def no_training(*args: object, **kwargs: object) -> DemoNet:
        raise AssertionError("the cached demo weights were not used")

    monkeypatch.setattr(demo, "train_demo_model", no_training)
    again = load_task(None, None, None)
    for key, value in demo_task.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_cache_key_follows_seed_and_architecture(demo_task: Task, tmp_path: Path) -> None:
    base = demo_weights_path(demo_task.data, tmp_path, seed=0)
    assert demo_weights_path(demo_task.data, tmp_path, seed=0) == base
    assert demo_weights_path(demo_task.data, tmp_path, seed=1) != base
    # another seed splits digits differently, so its teacher never saw that seed's val images
    other = load_data("digits", seed=1)
    assert demo_weights_path(other, tmp_path, seed=1) != demo_weights_path(other, tmp_path, 0)


def test_corrupt_cache_file_is_retrained_and_replaced(
    demo_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = demo_weights_path(demo_task.data, tmp_path, seed=0)
    path.write_bytes(b"torn write")
    trained: list[int] = []
    quick = demo.train_demo_model

    def one_epoch(data: object, *, seed: int = 0) -> DemoNet:
        trained.append(seed)
        return quick(data, seed=seed, epochs=1)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "train_demo_model", one_epoch)
    model = load_demo_model(demo_task.data, cache_dir=tmp_path, seed=0)
    assert trained == [0]
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["fc.weight"], model.fc.weight)
    assert list(tmp_path.glob("*.tmp")) == []  # the temp file was renamed, not left behind


def test_demo_architecture_has_residual_blocks_and_takes_other_shapes() -> None:
    model = build_demo_model(in_channels=3, num_classes=4).eval()
    names = dict(model.named_modules())
    for name in ("conv1", "block1.conv2", "down_conv", "block2.conv2", "fc"):
        assert name in names
    assert model.block1.conv2.out_channels == model.conv1.out_channels  # identity add
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    # The identity path is real: zeroing the block's last BN leaves relu(x) of the input.
    block = model.block1
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(1, 32, 8, 8)
        assert torch.equal(block(x), torch.relu(x))
