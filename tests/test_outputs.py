"""Models whose forward returns more than a logits tensor (issue 15, part 2): named tuples
(torchvision's GoogLeNet in training mode), dicts and ``ModelOutput``-like objects run through
intake, search, export and verify as if they returned the logits."""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from search_fixture import run_short_search

from autocompress.errors import ModelSpecError
from autocompress.export import export_from_storage
from autocompress.intake import load_data, load_model
from autocompress.intake.outputs import prediction_of

NAMED_TUPLE_MODEL = '''
from typing import NamedTuple

import torch
from torch import nn


class Outputs(NamedTuple):
    features: torch.Tensor
    logits: torch.Tensor


class TupleNet(nn.Module):
    """Returns (features, logits) as a named tuple, logits second: the default must pick
    the field called logits, not the first tensor."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> Outputs:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        features = x.mean(dim=(2, 3))
        return Outputs(features, self.fc(features))


def build(num_classes: int = 10) -> nn.Module:
    return TupleNet(num_classes)
'''


class _Output(OrderedDict):  # the shape of transformers' ModelOutput: a dict with attributes
    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class _Pair(NamedTuple):
    logits: torch.Tensor
    aux: torch.Tensor


def test_prediction_of_picks_logits_from_every_container() -> None:
    logits, other = torch.ones(2, 3), torch.zeros(2, 5)
    assert prediction_of(logits) is logits
    assert prediction_of(_Pair(logits, other)) is logits
    assert prediction_of(_Output(hidden=other, logits=logits)) is logits
    assert prediction_of({"hidden": other, "logits": logits}) is logits
    assert prediction_of((other, logits)) is other  # plain tuples: the first tensor
    assert prediction_of((other, logits), 1) is logits
    assert prediction_of({"a": other}, "b") is None
    assert prediction_of(("text", 3)) is None


def test_a_named_tuple_model_returns_its_logits_with_names_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "tuplenet.py"
    source.write_text(NAMED_TUPLE_MODEL)
    model = load_model(f"{source}:build", input_shape=(1, 8, 8))
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "conv1.weight"  # no wrapper prefix: plans name the same layers
    for mode in (True, False):
        model.train(mode)
        out = model(torch.randn(2, 1, 8, 8))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_googlenet_in_training_mode_returns_logits_and_takes_weights_with_aux(
    tmp_path: Path,
) -> None:
    """GoogLeNet returns GoogLeNetOutputs(logits, aux2, aux1) while training: the auxiliary
    heads (training-only, invisible to pruning traced in eval mode) are dropped, and a
    checkpoint that still holds them loads."""
    from torchvision import models

    full = models.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=False)
    weights = tmp_path / "googlenet.pt"
    torch.save(full.state_dict(), weights)
    model = load_model("torchvision:googlenet", weights, num_classes=10,
                       input_shape=(3, 32, 32))
    assert model.aux1 is None and model.aux2 is None
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_a_model_without_any_tensor_output_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("import torch\n\nclass M(torch.nn.Module):\n"
                      "    def forward(self, x):\n        return {'text': 'no tensor'}\n\n"
                      "def build():\n    return M()\n")
    with pytest.raises(ModelSpecError, match=r"returned dict with keys text with no tensor"):
        load_model(f"{source}:build", input_shape=(1, 8, 8))


def test_named_tuple_model_search_export_verify(tmp_path: Path) -> None:
    """A model returning a named tuple, searched on digits, exported and verified."""
    source = tmp_path / "tuplenet.py"
    source.write_text(NAMED_TUPLE_MODEL)
    torch.manual_seed(0)
    model = load_model(f"{source}:build", input_shape=(1, 8, 8))
    # A trained teacher: an untrained one's logits are near-ties (top-2 gaps of 0.03), which
    # int8 rounding flips, and export's pt2-vs-ONNX agreement check then fails by chance.
    data = load_data("digits")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for x, y in itertools.islice(data.batches("train", 64, shuffle=True, seed=0), 60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    weights = tmp_path / "tuplenet.pt"
    torch.save(model.state_dict(), weights)
    short = run_short_search(tmp_path, study="tuple", model=f"{source}:build",
                             weights=str(weights), data="digits", trials=2, guided=False,
                             budgets=())
    measured = [r for r in short.result.records if r.measured]
    assert any(r.baseline is None for r in measured), "a searched trial was measured"
    best = max(measured, key=lambda r: r.accuracy or 0)
    export_from_storage(short.storage_url, "tuple", out=tmp_path / "out", trial=best.number,
                        verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["test_accuracy"] == pytest.approx(best.test_accuracy)
