"""Per-layer profile: FLOPs agree with fvcore, latency shares add up, every layer exported."""

from __future__ import annotations

import csv
import io
import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

from autocompress.errors import InputError
from autocompress.runtime.torch_profile import (
    UNATTRIBUTED,
    ProfileReport,
    format_table,
    profile_model,
)


@pytest.fixture(scope="module")
def resnet18_report() -> ProfileReport:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()  # random weights: FLOPs and timing ignore values
    model.train()  # profile_model must use eval and hand the mode back
    report = profile_model(model, torch.randn(1, 3, 224, 224), repeats=3)
    assert model.training
    return report


def _fvcore_total(model: nn.Module, x: torch.Tensor) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model.eval(), x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


RESNET18_LEAVES = [
    n for n, m in torchvision.models.resnet18().named_modules() if not any(m.children())
]


def test_resnet18_totals_match_fvcore_and_torch(resnet18_report: ProfileReport) -> None:
    report = resnet18_report
    expected = _fvcore_total(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    assert report.total_flops == expected
    assert report.total_flops == pytest.approx(1.82e9, rel=0.01)
    # Every resnet18 FLOP is inside a leaf layer (fvcore ignores the residual adds).
    assert report.unattributed_flops == 0
    assert sum(row.flops for row in report.rows) == report.total_flops
    assert report.rows[-1].name == UNATTRIBUTED and report.rows[-1].flops == 0
    assert report.total_params == 11_689_512
    assert sum(row.params for row in report.rows) == report.total_params
    assert report.threads == 1 and torch.get_num_threads() == 1
    assert report.input_shape == [1, 3, 224, 224] and report.repeats == 3


def test_resnet18_rows_cover_every_leaf_with_shapes(resnet18_report: ProfileReport) -> None:
    rows = {row.name: row for row in resnet18_report.rows}
    assert [row.name for row in resnet18_report.rows] == [*RESNET18_LEAVES, UNATTRIBUTED]
    assert rows["conv1"].type == "Conv2d" and rows["conv1"].output_shape == [1, 64, 112, 112]
    assert rows["conv1"].flops == 64 * 112 * 112 * 3 * 7 * 7  # one multiply-add = one flop
    assert rows["layer4.1.conv2"].output_shape == [1, 512, 7, 7]
    assert rows["fc"].output_shape == [1, 1000] and rows["fc"].params == 513_000
    assert rows["layer1.0.relu"].calls == 2  # torchvision's BasicBlock reuses its ReLU
    assert rows["conv1"].calls == 1


def test_resnet18_latency_shares_sum_to_100(resnet18_report: ProfileReport) -> None:
    report = resnet18_report
    shares = [row.latency_share for row in report.rows]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)
    assert all(s >= 0 for s in shares)
    leaves = [r for r in report.rows if r.name != UNATTRIBUTED]
    assert report.leaf_ms == pytest.approx(sum(r.latency_ms for r in leaves))
    # shares are of the whole hooked forward: the unattributed row holds the rest
    assert report.hooked_forward_ms == pytest.approx(sum(r.latency_ms for r in report.rows))
    assert report.forward_ms > 0
    # Time lands where the work is: the 20 convs do ~99% of the FLOPs.
    conv_share = sum(r.latency_share for r in report.rows if r.type == "Conv2d")
    assert conv_share > 40


def test_json_and_csv_round_trips_keep_every_layer(resnet18_report: ProfileReport) -> None:
    report = resnet18_report
    text = report.to_json()
    assert ProfileReport.from_json(text) == report
    data = json.loads(text)
    assert [r["name"] for r in data["rows"]] == [*RESNET18_LEAVES, UNATTRIBUTED]
    assert data["total_flops"] == report.total_flops

    csv_text = report.to_csv()
    records = list(csv.DictReader(io.StringIO(csv_text)))
    assert [r["name"] for r in records] == [*RESNET18_LEAVES, UNATTRIBUTED]
    assert records[0]["output_shape"] == "1x64x112x112"
    assert ProfileReport.rows_from_csv(csv_text) == report.rows


def test_format_table_lists_layers_totals_and_units(resnet18_report: ProfileReport) -> None:
    table = format_table(resnet18_report)
    lines = table.splitlines()
    for name in RESNET18_LEAVES:
        assert any(line.split()[:1] == [name] for line in lines), name
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert "11,689,512" in total and "1.82G" in total and "100.0" in total
    assert "one multiply-add = 1 flop" in table
    assert f"{resnet18_report.forward_ms:.3f} ms" in table
    assert "\x1b[" not in table  # no terminal colour codes


class _Attention(nn.Module):
    """A matmul in forward outside any leaf: fvcore counts it, no leaf row owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.ones(1))  # a parameter of a non-leaf module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q(x) @ self.k(x).transpose(1, 2)) * self.scale


def test_functional_flops_are_reported_as_unattributed() -> None:
    model = _Attention()
    x = torch.randn(2, 8, 16)
    report = profile_model(model, x, repeats=2)
    assert [row.name for row in report.rows] == ["q", "k", UNATTRIBUTED]
    assert report.total_flops == _fvcore_total(model, x)
    matmul = 2 * 8 * 8 * 16
    assert report.unattributed_flops == matmul == report.rows[-1].flops
    assert report.total_params == 2 * (16 * 16 + 16) + 1
    assert "in functional ops and non-leaf modules" in format_table(report)


# tiny ViT: 17 tokens (16 patches + class token), width 32, 2 layers, batch 1
_TOKENS, _WIDTH, _LAYERS = 17, 32, 2
_PLAIN = 251_488  # fvcore without attention formulas, inference fast path (no_grad)
_ATTENTION = _LAYERS * (
    4 * _TOKENS * _WIDTH * _WIDTH  # q, k, v and output projections
    + 2 * _TOKENS * _TOKENS * _WIDTH  # Q @ K^T and softmax(.) @ V
)


def test_attention_flops_are_counted_on_both_attention_paths() -> None:
    """A ViT's fused attention counted zero before (issue 15: vit_b_16 showed 11.3 of 17.6
    GFLOPs): nn.MultiheadAttention's no_grad fast path and the SDPA op of training mode now
    give the same total."""
    from autocompress.model import flops as flop_count
    from tests.tiny_models import tiny_vit

    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    report = profile_model(model, x, repeats=2)
    assert report.total_flops == _PLAIN + _ATTENTION
    assert flop_count.count(model, x).total == _PLAIN + _ATTENTION  # grad mode: SDPA path
    assert not flop_count.count(model, x).heavy_uncounted
    table = format_table(report)
    assert "run inside their parent's fused attention kernel" in table
    assert "never called" not in table


def test_an_op_without_a_formula_is_named_not_hidden() -> None:
    class Cumulative(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, dim=1) @ x.transpose(0, 1)

    report = profile_model(Cumulative(), torch.randn(4, 8), repeats=2)
    assert any("aten::cumsum x1" in note for note in report.notes)
    assert "FLOPs not counted" in format_table(report)


def test_single_module_model_and_bad_arguments() -> None:
    report = profile_model(nn.Linear(4, 3), torch.randn(5, 4), repeats=2)
    assert [(r.name, r.type, r.output_shape, r.params, r.flops) for r in report.rows][:1] == [
        ("(model)", "Linear", [5, 3], 15, 60)
    ]
    assert sum(r.latency_share for r in report.rows) == pytest.approx(100.0)
    with pytest.raises(InputError, match="repeats 0"):
        profile_model(nn.Linear(4, 3), torch.randn(5, 4), repeats=0)
    with pytest.raises(InputError, match="example_input must be a tensor"):
        profile_model(nn.Linear(4, 3), [1.0, 2.0], repeats=1)  # type: ignore[arg-type]


def test_the_unattributed_row_is_there_when_the_layers_take_all_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model whose FLOPs are all in leaf layers, timed so that the per-layer medians sum
    to the whole forward (on a loaded machine they can): the rest is 0, and the report keeps
    its (unattributed) row all the same (CI saw the row vanish by timing noise)."""
    from autocompress.runtime import torch_profile as profile_mod

    monkeypatch.setattr(profile_mod.statistics, "median", lambda values: 0.0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    report = profile_model(model, torch.randn(1, 4), repeats=2)
    assert [row.name for row in report.rows] == ["0", "1", UNATTRIBUTED]
    assert report.rows[-1].flops == 0 and report.rows[-1].latency_ms == 0


def test_recurrent_layers_are_counted() -> None:
    """nn.LSTM / nn.GRU / nn.RNN ran as one fused op fvcore has no formula for: a model of
    them counted zero FLOPs. Each weight matrix counts once per step and sequence."""
    from autocompress.model import flops as flop_count

    lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = torch.randn(3, 5, 8)
    per_step = 2 * (64 * 8 + 64 * 16) + 2 * (64 * 32 + 64 * 16)  # 2 directions x 2 layers
    with torch.no_grad():
        counted = flop_count.count(lstm, x)
    assert counted.total == 3 * 5 * per_step and not counted.heavy_uncounted
    gru = nn.GRU(8, 16).eval()  # unbatched (steps, features)
    with torch.no_grad():
        assert flop_count.count(gru, torch.randn(5, 8)).total == 5 * (48 * 8 + 48 * 16)
    rnn = nn.RNN(4, 6, nonlinearity="relu").eval()
    with torch.no_grad():
        assert flop_count.count(rnn, torch.randn(7, 2, 4)).total == 7 * 2 * (6 * 4 + 6 * 6)
