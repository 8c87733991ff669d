"""Inputs beyond one image tensor (issue 15): a task's samples may hold a feature vector,
token ids, or a tuple or dict of tensors (``input_ids`` and ``attention_mask``), packed into
one input that the wrapped model unpacks, all through search, export and verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from search_fixture import run_short_search
from torch import nn

from autocompress.errors import DataSpecError, ModelSpecError
from autocompress.export import export_from_storage
from autocompress.intake import load_task
from autocompress.intake.sample_inputs import (
    DICT,
    TUPLE,
    PackedInputs,
    layout_of,
    pack,
    single_input,
    unpack,
)
from autocompress.intake.user_task import TaskSpecError
from autocompress.runtime import scoring

W = "train sample 0 of 't'"


def test_one_tensor_has_no_layout_and_keeps_the_image_rules() -> None:
    assert layout_of(torch.zeros(3, 8, 8), W) is None
    assert single_input(torch.zeros(8, 8), W).shape == (1, 8, 8)  # a one-channel image
    assert single_input(torch.zeros(3, 8, 8, dtype=torch.uint8), W).dtype == torch.uint8
    assert single_input(torch.zeros(3, 8, 8, dtype=torch.int32), W).dtype == torch.float32
    ids = single_input(torch.ones(1, 12, dtype=torch.int32), W)  # a tokenizer's (1, L)
    assert ids.shape == (12,) and ids.dtype == torch.int64
    features = single_input(torch.ones(5, dtype=torch.float64), W)
    assert features.shape == (5,) and features.dtype == torch.float32
    with pytest.raises(DataSpecError, match=r"has input \(1, 2, 3, 4\).*feature vector"):
        single_input(torch.zeros(1, 2, 3, 4), W)


def test_dict_inputs_pack_and_unpack_to_their_own_shapes_and_dtypes() -> None:
    sample = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.tensor(
        [True, False, True])}
    layout = layout_of(sample, W)
    assert layout is not None and layout.kind == DICT and layout.integer
    assert [(f.name, f.shape, f.dtype) for f in layout.fields] == [
        ("input_ids", (2, 3), "int64"), ("attention_mask", (3,), "bool")]
    packed = pack(sample, layout, W)
    assert packed.dtype == torch.int64 and packed.shape == (9,)
    back = unpack(torch.stack([packed, packed]), layout)
    assert torch.equal(back["input_ids"][1], sample["input_ids"])
    assert back["attention_mask"].dtype == torch.bool
    assert torch.equal(back["attention_mask"][0], sample["attention_mask"])
    assert "input_ids [2, 3] int64" in layout.describe()


def test_a_tokenizers_one_text_output_is_read_per_token() -> None:
    """``tokenizer(text, return_tensors="pt")`` gives (1, L) tensors in a dict-like object:
    each field is read as (L,), so a batch reaches the model as (N, L)."""
    from collections import UserDict

    sample = UserDict({"input_ids": torch.ones(1, 5, dtype=torch.int64),
                       "attention_mask": torch.ones(1, 5, dtype=torch.int64)})
    layout = layout_of(sample, W)
    assert layout is not None and [f.shape for f in layout.fields] == [(5,), (5,)]
    back = unpack(torch.stack([pack(sample, layout, W)] * 3), layout)
    assert back["input_ids"].shape == (3, 5)


def test_tuple_inputs_reach_the_model_positionally() -> None:
    class Two(nn.Module):
        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return image.flatten(1).sum(1, keepdim=True) * extra

    sample = (torch.rand(1, 4, 4), torch.rand(2))
    layout = layout_of(sample, W)
    assert layout is not None and layout.kind == TUPLE and not layout.integer
    packed = torch.stack([pack(sample, layout, W)])
    wrapped = PackedInputs(Two(), layout)
    assert wrapped.input_dtype == torch.float32
    expected = Two()(sample[0].unsqueeze(0), sample[1].unsqueeze(0))
    assert torch.allclose(wrapped(packed), expected)


@pytest.mark.parametrize(
    ("first", "other", "fragments"),
    [
        ({"ids": torch.zeros(3, dtype=torch.int64), "x": torch.zeros(3)}, None,
         ("mixes integer inputs (ids) with float inputs (x)",)),
        ({"ids": torch.zeros(3, dtype=torch.int64)}, {"tokens": torch.zeros(3, dtype=torch.int64)},
         ("has inputs ['tokens']", "keys ['ids']")),
        ((torch.zeros(3), torch.zeros(2)), (torch.zeros(3), torch.zeros(4)),
         ("input '1' (4,)", "one shape and kind per input")),
        ((torch.zeros(3), torch.zeros(2)), (torch.zeros(3),), ("has 1 inputs", "2 input tensors")),
        ((torch.zeros(3), "text"), None, ("input 1 is str", "tensors or numpy arrays")),
        ({}, None, ("empty dict of inputs",)),
    ],
)
def test_bad_inputs_are_one_line(first: object, other: object, fragments: tuple[str, ...]) -> None:
    with pytest.raises(DataSpecError) as info:
        layout = layout_of(first, W)
        assert layout is not None
        pack(other, layout, "train sample 7 of 't'")
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


# A bag-of-tokens classifier taking input_ids and attention_mask by name, as Hugging Face
# models do: digits' 64 pixels as (position, value) tokens, background tokens masked out.
DICT_TASK = '''
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.intake import load_task


class MaskedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64 * 17, 24)
        self.hidden = nn.Linear(24, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(torch.relu(self.hidden(pooled)))


def tokens(image):
    values = (image.reshape(-1) * 16).round().long().clamp(0, 16)
    return {"input_ids": torch.arange(64) * 17 + values, "attention_mask": values > 0}


def build():
    demo = load_task(None, None, None)
    def split(name):
        return [(tokens(x * demo.data.std[0] + demo.data.mean[0]), int(y))
                for xb, yb in demo.data.batches(name, 256) for x, y in zip(xb, yb.tolist())]
    parts = {name: split(name) for name in ("train", "val", "test")}
    torch.manual_seed(0)
    net = MaskedBag()
    ids = torch.stack([s["input_ids"] for s, _ in parts["train"]])
    mask = torch.stack([s["attention_mask"] for s, _ in parts["train"]])
    y = torch.tensor([label for _, label in parts["train"]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        idx = torch.randint(0, len(y), (128,))
        loss = F.cross_entropy(net(ids[idx], mask[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"model": net.eval(), "data": parts}
'''


def _task(folder: Path, source: str, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source)
    return f"{folder / name}:build"


def _searched(tmp_path: Path, spec: str, study: str, *, trials: int, steps: int,
              teacher_above: float) -> tuple[Any, list[Any]]:
    """A short search of the task; its fp32 teacher above ``teacher_above``, every searched
    trial complete. Returns the search and those trials."""
    short = run_short_search(tmp_path, study=study, task=spec, trials=trials, guided=False,
                             budgets=(), finetune_steps=steps)
    fp32 = short.result.fp32
    assert fp32 is not None and (fp32.accuracy or 0) > teacher_above
    searched = [r for r in short.result.records if r.baseline is None]
    assert searched and all(r.state == "COMPLETE" for r in searched), [
        r.fail_reason for r in searched]
    return short, searched


def test_a_dict_input_task_is_searched_exported_and_verified(tmp_path: Path) -> None:
    spec = _task(tmp_path, DICT_TASK, "dict_task.py")
    task = load_task(None, None, None, task=spec)
    assert isinstance(task.model, PackedInputs) and task.input_shape == (128,)
    assert task.data.is_flat and task.data.train.x.dtype == torch.int64
    # the packed teacher scores far above chance (0.1): ids and masks arrive where they belong
    short, searched = _searched(tmp_path, spec, "dict", trials=2, steps=30, teacher_above=0.7)
    best = max(searched, key=lambda r: r.accuracy or 0)
    export_from_storage(short.storage_url, "dict", out=tmp_path / "out", trial=best.number,
                        verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["agreement"] >= 0.99
    assert report["inputs"]["dtype"] == "int64" and report["inputs"]["shape"] == ["N", 128]
    assert [f["name"] for f in report["inputs"]["layout"]["fields"]] == [
        "input_ids", "attention_mask"]
    assert "attention_mask [64] bool" in (tmp_path / "out" / "report.md").read_text()
    # the exported file takes the packed ids and masks and scores what the search recorded
    options = dict((best.json_attr("runtime") or {}).get("session_options") or {})
    predicted = scoring.predictions(tmp_path / "out" / "model.onnx",
                                    task.data.batches("test", 256), threads=1,
                                    session_options=options)
    accuracy = float((predicted == task.data.test.y.numpy()).mean())
    assert accuracy == pytest.approx(report["verification"]["test_accuracy"], abs=1e-6)


def test_a_feature_vector_task_is_fed_as_it_is(tmp_path: Path) -> None:
    source = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    x = torch.randn(120, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    parts = [(x[i], int(y[i])) for i in range(120)]
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    return {"model": net.eval(), "data": {"train": parts[:80], "test": parts[80:]}}
'''
    spec = _task(tmp_path, source, "features.py")
    task = load_task(None, None, None, task=spec)
    assert task.input_shape == (6,) and task.data.train.x.dtype == torch.float32
    xb, _ = next(task.data.batches("test", 8))
    assert torch.equal(xb, task.data.test.x[:8])  # no image normalisation
    with pytest.raises(DataSpecError, match="--input-size, --mean and --std apply to images"):
        load_task(None, None, None, task=spec, mean=(0.5,), std=(0.2,))


def test_tuple_inputs_need_the_module_that_takes_them(tmp_path: Path) -> None:
    source = '''
import torch


def build():
    parts = [((torch.zeros(3), torch.zeros(2)), i % 2) for i in range(20)]
    return {"model": "zoo:resnet20", "data": {"train": parts, "test": parts}}
'''
    spec = _task(tmp_path, source, "tuple_spec.py")
    with pytest.raises(TaskSpecError, match="yields tuple inputs but names the model"):
        load_task(None, None, None, task=spec)


def test_a_data_factory_with_tuple_inputs_asks_for_a_task(tmp_path: Path) -> None:
    (tmp_path / "pairs.py").write_text('''
import torch


def make():
    parts = [((torch.zeros(3), torch.zeros(2)), i % 2) for i in range(20)]
    return parts, parts
''')
    with pytest.raises(DataSpecError, match="need a task"):
        load_task("zoo:resnet20", None, f"{tmp_path / 'pairs.py'}:make")


SEQUENCE_TASK = '''
import torch
from sklearn.datasets import load_digits
from torch import nn


class Rows(nn.Module):
    """Reads a digit's 8 rows as 8 steps of 8 features: (N, 8, 8), no channel."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        steps, _ = self.lstm(x)
        return self.out(torch.relu(self.hidden(steps[:, -1])))


def build():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = Rows()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(0, 1400, (128,))
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    parts = [(x[i], int(y[i])) for i in range(len(y))]
    return {"model": net.eval(), "data": {"train": parts[:1400], "test": parts[1400:]}}
'''


def test_two_dimensional_samples_reach_a_sequence_model_as_sequences(tmp_path: Path) -> None:
    """A (8, 8) float sample is a one-channel image to a CNN, but an LSTM rejects (N, 1, 8, 8):
    the task's model decides, and the sequences are fed as they are through search, export
    and verify (the image reading stopped such tasks with a hint about --input-size)."""
    spec = _task(tmp_path, SEQUENCE_TASK, "rows.py")
    task = load_task(None, None, None, task=spec)
    assert task.input_shape == (8, 8) and task.data.is_flat
    assert "fed as sequences" in task.data.split_method
    xb, _ = next(task.data.batches("test", 8))
    assert torch.equal(xb, task.data.test.x[:8])  # no image scaling or normalisation
    short, searched = _searched(tmp_path, spec, "rows", trials=1, steps=20, teacher_above=0.8)
    export_from_storage(short.storage_url, "rows", out=tmp_path / "out",
                        trial=searched[0].number, verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["agreement"] >= 0.99
    assert report["inputs"]["shape"] == ["N", 8, 8]


def test_a_model_that_takes_neither_reading_names_both(tmp_path: Path) -> None:
    source = '''
import torch
from torch import nn


def build():
    parts = [(torch.rand(8, 8), i % 2) for i in range(40)]
    return {"model": nn.Linear(5, 2), "data": {"train": parts, "test": parts}}
'''
    spec = _task(tmp_path, source, "neither.py")
    with pytest.raises(ModelSpecError, match=r"rejects input of shape \(1, 1, 8, 8\).*fed as "
                       r"sequences \(8, 8\) it fails too: RuntimeError"):
        load_task(None, None, None, task=spec)
