"""Whole attention heads pruned dependency-aware (issue 15, part 4) on a tiny BERT."""

from __future__ import annotations

import warnings

import pytest
import torch

from autocompress.config.options import SearchConfig
from autocompress.model.plan import CompressionPlan
from autocompress.search.evaluate import evaluate_plan
from autocompress.study import attrs as trial_attrs
from autocompress.transform import prune
from autocompress.transform.prune_heads import Heads, head_removal
from autocompress.transform.survey import build_inventory

transformers = pytest.importorskip("transformers")

QUERY = "model.bert.encoder.layer.0.attention.self.query"
ATTENTION = "model.bert.encoder.layer.0.attention.self"


def _tiny_bert(heads: int = 4) -> torch.nn.Module:
    from autocompress.intake.text import TokenClassifier

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # weights large enough that every head matters to the output
        for param in model.parameters():
            param.normal_(0, 0.5)
    return TokenClassifier(model, pad_token_id=0).eval()


def test_heads_kept_and_removed_are_whole_heads() -> None:
    # the head count kept follows the channel rule without rounding: never 0
    assert [prune.kept_channels(12, r, round_to=1) for r in (0.0, 0.25, 0.5, 0.99)] == [
        12, 9, 6, 1]
    heads = Heads("a", count=4, size=2)
    importance = torch.tensor([1.0, 1.0, 0.1, 0.1, 5.0, 5.0, 0.2, 0.3])
    assert head_removal(importance, heads, 2) == [2, 3, 6, 7]  # heads 1 and 3, whole


def test_attention_projections_are_one_group_pruned_in_heads() -> None:
    model = _tiny_bert()
    x = torch.randint(1, 40, (2, 12))
    inventory = build_inventory(model, x[:1])
    assert QUERY in inventory.prunable_groups()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune.prune_with_report(model, CompressionPlan(prune={QUERY: 0.5}), x)
    assert report.kept[QUERY] == 16 and not report.failed  # 2 of 4 heads of 8 channels
    modules = dict(pruned.named_modules())
    attention = modules[ATTENTION]
    assert attention.num_attention_heads == 2 and attention.all_head_size == 16
    for name in ("query", "key", "value"):
        assert modules[f"{ATTENTION}.{name}"].weight.shape == (16, 32)
    assert modules["model.bert.encoder.layer.0.attention.output.dense"].weight.shape == (32, 16)
    # Removing heads is exactly silencing them: zero the dropped heads' value rows in the
    # original and it computes what the pruned model computes.
    kept_rows = {tuple(r.tolist()) for r in modules[f"{ATTENTION}.value"].weight}
    silenced = _tiny_bert()
    value = dict(silenced.named_modules())[f"{ATTENTION}.value"]
    with torch.no_grad():
        for row in range(32):
            if tuple(value.weight[row].tolist()) not in kept_rows:
                value.weight[row].zero_()
                value.bias[row] = 0.0
    with torch.no_grad():
        assert torch.allclose(pruned(x), silenced(x), atol=1e-5)
        assert not torch.allclose(pruned(x), model(x), atol=1e-3)  # the heads did matter


def test_a_head_pruned_plan_runs_through_a_trial_to_the_onnx_file() -> None:
    from autocompress.intake import Task
    from autocompress.intake.data import DataSplits, Split

    model = _tiny_bert()
    torch.manual_seed(1)
    x = torch.randint(1, 40, (96, 12))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    split = Split(x=x, y=y, indices=torch.arange(96))
    data = DataSplits(spec="tokens", seed=0, classes=["a", "b"], train=split, val=split,
                      test=split, image_size=(0, 0), mean=(), std=(), value_scale=1.0,
                      split_method="the same tokens")
    task = Task(model=model, data=data, model_spec="tiny-bert", data_spec="tokens",
                input_shape=(12,), num_classes=2)  # type: ignore[arg-type]
    plan = CompressionPlan(prune={QUERY: 0.5}, finetune_steps=4)
    config = SearchConfig(latency_repeats=4, learning_rate=1e-4, prune_step=0.25)
    record = evaluate_plan(task, plan, config)
    assert record.measured and record.test_accuracy is not None
    # q, k and v lost 16 rows (+16 biases) each, the output projection 16 input columns
    teacher = sum(p.numel() for p in model.parameters())
    assert teacher - int(record.attrs[trial_attrs.PARAMS]) == 3 * (16 * 32 + 16) + 32 * 16
