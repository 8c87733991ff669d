"""Hugging Face text classifiers, offline (issue 15, parts 3-4): a tiny BERT built from a
config in the test (random weights, a few hundred KB) on a tiny text set, through search,
export and verify; every Linear, attention projections included, quantized in the file."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from pg import unavailable
from search_fixture import run_short_search

from autocompress.errors import DataSpecError, ModelSpecError
from autocompress.export import export_from_storage
from autocompress.intake import load_model, load_task
from autocompress.study import attrs as trial_attrs
from autocompress.transform.survey import build_inventory

try:
    import transformers
except ImportError:  # skipped on a laptop without it; under .ci/run (dev extra) a failure
    transformers = None


@pytest.fixture(scope="module", autouse=True)
def _needs_transformers() -> None:  # module scope: before the tiny_bert fixture is built
    if transformers is None:
        unavailable("transformers is not installed: pip install -e '.[dev]' (or '.[text]')")

WORDS = ("good great fine nice love bad awful poor hate boring "
         "film plot actor the a was is very not").split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder with tokenizer, reviews.csv): 300 snippets, fresh or rotten."""
    import torch

    folder = tmp_path_factory.mktemp("tiny-bert")
    model_dir = folder / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(
        model_dir)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    rows = folder / "reviews.csv"
    with rows.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["snippet", "verdict"])
        for _ in range(300):
            label = rng.choice(["fresh", "rotten"])
            pool = WORDS[:5] if label == "fresh" else WORDS[5:10]
            words = [rng.choice(WORDS[10:]) if rng.random() < 0.5 else rng.choice(pool)
                     for _ in range(8)]
            writer.writerow([" ".join(words), label])
    return model_dir, rows


def _data(rows: Path) -> str:
    return f"text:{rows}?text=snippet&label=verdict&max_length=16"


def test_text_task_is_token_ids_with_stratified_splits(tiny_bert: tuple[Path, Path]) -> None:
    model_dir, rows = tiny_bert
    task = load_task(f"hf:{model_dir}", None, _data(rows))
    assert task.input_shape == (16,) and task.data.is_flat
    assert task.data.classes == ["fresh", "rotten"]
    assert [len(task.data.split(s)) for s in ("train", "val", "test")] == [240, 30, 30]
    x, _ = next(task.data.batches("val", 8))
    assert x.dtype.is_floating_point is False and x.shape == (8, 16)
    assert task.model(x).shape == (8, 2)
    inventory = build_inventory(task.model, x[:1])
    query = "model.bert.encoder.layer.0.attention.self.query"
    # query, key and value are one group, pruned in whole heads (test_prune_heads)
    assert query in inventory.prunable_groups() and inventory.excluded_reason(query) is None
    assert "model.bert.encoder.layer.0.intermediate.dense" in inventory.prunable_groups()
    assert query in inventory.quantizable_layers()


def test_tiny_bert_search_export_verify(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, rows = tiny_bert
    short = run_short_search(tmp_path, study="bert", model=f"hf:{model_dir}", data=_data(rows),
                             trials=2, guided=False, budgets=(), finetune_steps=10)
    measured = [r for r in short.result.records if r.measured]
    baselines = {r.baseline for r in measured}
    # Linear layers hold the FLOPs: the guide's dynamic int8 recipe is a baseline here
    assert {"fp32", "int8-dynamic"} <= baselines
    searched = [r for r in measured if r.baseline is None]
    assert searched, [r.fail_reason for r in short.result.records]
    types = json.loads(searched[0].attrs[trial_attrs.WEIGHT_TYPES])
    attention = [k for k in types if "attention.self" in k]
    assert attention and all(types[k] in ("INT8", "INT4", "FLOAT") for k in attention)
    best = searched[0]
    export_from_storage(short.storage_url, "bert", out=tmp_path / "out", trial=best.number,
                        verify=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["test_accuracy"] == pytest.approx(best.test_accuracy)
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_bad_text_inputs_are_one_line(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, rows = tiny_bert
    with pytest.raises(DataSpecError, match=r"has no column 'review' \(columns: snippet, "
                                            r"verdict\); name them"):
        load_task(f"hf:{model_dir}", None, f"text:{rows}?text=review&label=verdict")
    with pytest.raises(ModelSpecError, match="is not a transformers model folder"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(DataSpecError, match="no tokenizer could be loaded from"):
        load_task(f"hf:{model_dir}", None, f"{_data(rows)}&tokenizer={tmp_path}")
    with pytest.raises(DataSpecError, match="text: data needs a tokenizer"):
        load_task("demo", None, _data(rows))
    with pytest.raises(DataSpecError, match="option 'maxlen=8' is unknown"):
        load_task(f"hf:{model_dir}", None, f"text:{rows}?maxlen=8")


@pytest.mark.parametrize("activation_bits", [8, 32])
def test_embedding_tables_are_quantized_weight_only(
    tiny_bert: tuple[Path, Path], tmp_path: Path, activation_bits: int,
) -> None:
    """Half of a small BERT's bytes are its embedding tables: they are planned layers too,
    stored as integer rows dequantized in front of the Gather (static QDQ or weight-only)."""
    from autocompress.model.plan import CompressionPlan
    from autocompress.runtime import scoring
    from autocompress.transform import quantize

    model_dir, rows = tiny_bert
    task = load_task(f"hf:{model_dir}", None, _data(rows))
    x = task.data.example_input(4)
    layers = build_inventory(task.model, x[:1]).quantizable_layers()
    word = "model.bert.embeddings.word_embeddings"
    assert word in layers
    plan = CompressionPlan(bits={layer: 4 if "embeddings" in layer else 8 for layer in layers},
                           activation_bits=activation_bits)
    qat = quantize.prepare_qat(task.model, plan)
    quantize.calibrate(qat, [x])
    info = quantize.export_onnx(qat, x[:1], tmp_path / "q.onnx", plan, [x])
    assert info.weight_types[word] == "INT4"
    assert info.weight_types["model.bert.encoder.layer.0.attention.self.query"] == "INT8"
    fp32 = quantize.export_float_onnx(task.model, x[:1], tmp_path / "f.onnx")
    assert info.size_bytes < 0.5 * fp32.stat().st_size
    # the file scores what the fake-quantized model scores
    import torch

    with torch.no_grad():
        expected = qat.eval()(x).argmax(dim=1)
    got = scoring.predictions(info.path, [x], threads=1)
    assert (got == expected.numpy()).mean() >= 0.75


def test_hidden_states_are_the_feature_distillation_layers(tiny_bert: tuple[Path, Path]) -> None:
    """Feature KD on a transformer matches its encoder blocks' hidden states (tuples out of
    each block), a pruned student's narrower ones through the adapters."""
    import copy

    import torch

    from autocompress.config.options import SearchConfig
    from autocompress.model import space
    from autocompress.train.features import FeatureDistiller

    model_dir, rows = tiny_bert
    task = load_task(f"hf:{model_dir}", None, _data(rows))
    x = task.data.example_input(4)
    inventory = build_inventory(task.model, x[:1])
    layers = space.feature_layers(inventory, SearchConfig())
    assert layers == ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]
    student = copy.deepcopy(task.model).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with FeatureDistiller(student, task.model, [(n, n) for n in layers], x) as fd:
        student(x)
        with torch.no_grad():
            task.model(x)
        loss = fd.loss()
    assert torch.isfinite(loss) and float(loss) > 0
