"""Targets beyond class labels (issue 15): a task with its own metric may yield any numeric
target (values, masks, several numbers per sample); float targets make the outputs values
(MSE, output-matching distillation, value agreement at export) all through search, export
and verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from search_fixture import run_short_search

from autocompress.errors import DataSpecError, InputError
from autocompress.export import export_from_storage
from autocompress.intake import load_task
from autocompress.intake.metric import TOP1, Metric
from autocompress.intake.sample_targets import ANY, CLASSES, read_target, stack_targets
from autocompress.intake.splitting import split_positions
from autocompress.runtime import scoring
from autocompress.search.choice_score import score_choice
from autocompress.train import losses

# The demo CNN's logits turned into a value: the expected digit under its softmax (a real
# regression model without training one); targets are the digit as a float.
REGRESSION_TASK = '''
import numpy as np
import torch
from torch import nn

from autocompress.intake import load_task
from autocompress.intake.splitting import split_positions


class ExpectedDigit(nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.softmax = nn.Softmax(dim=1)
        self.value = nn.Linear(10, 1, bias=False)
        with torch.no_grad():
            self.value.weight.copy_(torch.arange(10.0).view(1, 10))

    def forward(self, x):
        return self.value(self.softmax(self.classifier(x)))  # (N, 1)


def mae(outputs, targets):
    return float(np.abs(outputs.reshape(-1) - targets.reshape(-1)).mean())


def build():
    demo = load_task(None, None, None)  # the trained demo CNN on digits, its splits
    def split(name):
        return [(x, float(y)) for xb, yb in demo.data.batches(name, 256)
                for x, y in zip(xb, yb.tolist())]
    return {"model": ExpectedDigit(demo.model), "metric": mae, "higher_is_better": False,
            "data": {"train": split("train"), "val": split("val"), "test": split("test")}}
'''


def _task(folder: Path, source: str, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source)
    return f"{folder / name}:build"


def test_class_labels_stay_as_before_and_any_target_is_kept_as_given() -> None:
    where = "train sample 0 of 'x'"
    assert read_target(3.0, mode=CLASSES, where=where) == 3  # whole floats are labels
    assert read_target(torch.tensor([2]), mode=CLASSES, where=where) == 2
    with pytest.raises(DataSpecError, match=r"labels must be ints >= 0 .* any numeric target"):
        read_target(0.5, mode=CLASSES, where=where)
    value = read_target(3.0, mode=ANY, where=where)
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
    mask = read_target(np.zeros((4, 4), dtype=np.uint8), mode=ANY, where=where)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.int64
    assert read_target([0.5, 1.5], mode=ANY, where=where).shape == (2,)  # type: ignore[union-attr]
    for bad in (True, "cat", torch.tensor([True]), object(), np.array(["a", "b"]),
                np.array([None])):
        with pytest.raises(DataSpecError, match="targets must be numbers"):
            read_target(bad, mode=ANY, where=where)


def test_stacked_targets_have_one_shape_and_float_wins() -> None:
    assert stack_targets([1, 0, 2], "d").dtype == torch.int64
    mixed = stack_targets([torch.tensor(1), torch.tensor(0.5)], "d")
    assert mixed.dtype == torch.float32 and mixed.tolist() == [1.0, 0.5]
    assert stack_targets([torch.zeros(2, 3), torch.ones(2, 3)], "d").shape == (2, 2, 3)
    with pytest.raises(DataSpecError, match="targets differ in shape"):
        stack_targets([torch.zeros(2), torch.zeros(3)], "the train dataset of 'x'")


def test_other_targets_are_split_at_random_and_class_labels_stratified() -> None:
    rng = np.random.default_rng(0)
    train, val = split_positions(torch.rand(10), (0.8, 0.2), rng)
    assert sorted([*train, *val]) == list(range(10)) and len(val) == 2
    labels = torch.tensor([0] * 5 + [1] * 5)
    train, val = split_positions(labels, (0.6, 0.4), np.random.default_rng(0))
    assert sorted(labels[val].tolist()) == [0, 0, 1, 1]  # two of each class


def test_default_losses_follow_the_targets() -> None:
    out = torch.tensor([[0.5], [2.0]])
    value = losses.default_hard_loss(out, torch.tensor([1.0, 2.0]))  # (N,) meets (N, 1)
    assert float(value) == pytest.approx(0.125)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    assert torch.allclose(losses.default_hard_loss(logits, labels),
                          F.cross_entropy(logits, labels))
    with pytest.raises(InputError, match=r"no class dimension.*float targets"):
        losses.kd_loss(torch.zeros(3), torch.zeros(3), 2.0)  # (N,) values, integer targets


def test_per_pixel_distillation_is_the_per_position_mean() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    flat_s = s.permute(0, 2, 3, 1).reshape(-1, 5)
    flat_t = t.permute(0, 2, 3, 1).reshape(-1, 5)
    assert float(losses.kd_loss(s, t, 2.0)) == pytest.approx(
        float(losses.kd_loss(flat_s, flat_t, 2.0)), rel=1e-5)


def test_sensitivity_damage_of_values_is_scale_free() -> None:
    teacher = [torch.tensor([[1.0], [3.0]])]
    ys = [torch.tensor([1.0, 3.0])]
    model = torch.nn.Identity()
    mae = Metric("mae", higher_is_better=False,
                 fn=lambda o, t: float(np.abs(o.reshape(-1) - t).mean()))
    off = [torch.tensor([[2.0], [3.0]])]
    damage, figure = score_choice(model, off, ys, teacher, mae)
    scaled, _ = score_choice(model, [x * 10 for x in off], ys, [t * 10 for t in teacher], mae)
    assert damage == pytest.approx(0.5) and scaled == pytest.approx(damage)
    assert figure == pytest.approx(-0.5)
    logits = [torch.tensor([[2.0, 0.0], [0.0, 2.0]])]
    assert score_choice(model, logits, [torch.tensor([0, 1])], logits, TOP1) == (0.0, 1.0)


def test_float_targets_need_the_tasks_own_metric(tmp_path: Path) -> None:
    source = REGRESSION_TASK.replace('"metric": mae, "higher_is_better": False,', "")
    source = source.replace("float(y))", "float(y) + 0.25)")  # not whole: not a class label
    spec = _task(tmp_path, source, "top1_regression.py")
    with pytest.raises(DataSpecError, match=r"labels must be ints >= 0 \(a task with its own "
                       "metric may yield any numeric target"):
        load_task(None, None, None, task=spec)


def test_a_regression_task_is_searched_exported_and_verified(tmp_path: Path) -> None:
    spec = _task(tmp_path, REGRESSION_TASK, "regression_task.py")
    task = load_task(None, None, None, task=spec)
    assert task.data.targets_are_values and not task.data.has_classes
    assert task.data.train.y.dtype == torch.float32 and task.num_classes == 1
    # quantization only: 30 steps do not repair a pruned digits CNN's regression (the early
    # stop rule, in MAE, would end those trials)
    short = run_short_search(tmp_path, study="reg", task=spec, trials=2, guided=False,
                             budgets=(), learning_rate=1e-3, prune_max=0.0, finetune_steps=60)
    assert short.result.metric == "neg_mae"
    searched = [r for r in short.result.records if r.baseline is None]
    assert searched and all(r.state == "COMPLETE" for r in searched), [
        r.fail_reason for r in searched]
    fp32 = short.result.fp32
    assert fp32 is not None and -0.5 < (fp32.accuracy or -9) <= 0  # the teacher's MAE
    best = max(searched, key=lambda r: r.accuracy or -9)
    export_from_storage(short.storage_url, "reg", out=tmp_path / "out", trial=best.number,
                        verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    verification = report["verification"]
    assert verification["agreement"] >= 0.99
    # the recorded figure is the MAE of the exported file's values on the test split, as a user
    # reproduces it from the file and the runtime the report names (threads, session options:
    # int8 kernels with and without QDQ folding differ in the last digits on AVX-512 VNNI)
    runtime = report["candidate"]["runtime"]
    outputs = scoring.raw_outputs(tmp_path / "out" / "model.onnx",
                                  (x for x, _ in task.data.batches("test", 256)),
                                  threads=int(runtime.get("threads") or 1),
                                  session_options=runtime.get("session_options") or {})
    mae = np.abs(outputs.reshape(-1) - task.data.test.y.numpy()).mean()
    assert verification["test_accuracy"] == pytest.approx(-mae, abs=1e-6)


# Per-pixel targets: a tiny fully convolutional net, trained in the factory, labels each
# pixel of a digit as ink or background (integer masks: logits per pixel on dimension 1).
SEGMENTATION_TASK = """
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.intake import load_task


def pixel_accuracy(outputs, targets):
    return float((outputs.argmax(axis=1) == targets).mean())


def build():
    demo = load_task(None, None, None)
    def split(name):
        return [(x, (x[0] > 0).long()) for xb, _ in demo.data.batches(name, 256) for x in xb]
    parts = {name: split(name) for name in ("train", "val", "test")}
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 2, 1))
    x = torch.stack([x for x, _ in parts["train"]])
    y = torch.stack([m for _, m in parts["train"]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"model": net.eval(), "data": parts, "metric": pixel_accuracy}
"""


def test_a_per_pixel_task_is_searched_exported_and_verified(tmp_path: Path) -> None:
    spec = _task(tmp_path, SEGMENTATION_TASK, "segmentation_task.py")
    task = load_task(None, None, None, task=spec)
    assert task.data.train.y.shape[1:] == (8, 8) and task.data.train.y.dtype == torch.int64
    assert not task.data.has_classes and not task.data.targets_are_values
    short = run_short_search(tmp_path, study="seg", task=spec, trials=2, guided=False,
                             budgets=(), learning_rate=1e-3)
    fp32 = short.result.fp32
    assert fp32 is not None and (fp32.accuracy or 0) > 0.95  # the teacher's pixel accuracy
    searched = [r for r in short.result.records if r.baseline is None and r.measured]
    assert searched, [r.fail_reason for r in short.result.records]
    best = max(searched, key=lambda r: r.accuracy or 0)
    export_from_storage(short.storage_url, "seg", out=tmp_path / "out", trial=best.number,
                        verify=True)
    verification = json.loads((tmp_path / "out" / "report.json").read_text())["verification"]
    assert verification["agreement"] >= 0.99  # per pixel
    assert verification["test_accuracy"] == pytest.approx(best.test_accuracy, abs=0.01)
