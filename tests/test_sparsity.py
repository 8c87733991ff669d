"""Unstructured L1 sparsity: dense storage saves nothing, the zipped file does (honest sizes)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from autocompress.model.plan import CompressionPlan
from autocompress.runtime import measure
from autocompress.train import distill
from autocompress.transform import quantize, sparsity
from autocompress.transform.sparsity import apply_unstructured
from autocompress.transform.student import build_student
from autocompress.transform.survey import build_inventory


def test_sparsity_saves_zip_bytes_not_raw_bytes(demo_task, tmp_path: Path) -> None:
    model = demo_task.model
    example = demo_task.data.example_input(1)
    layers = build_inventory(model, example).quantizable_layers()
    sparse = apply_unstructured(model, {layer: 0.8 for layer in layers})
    zeros = sum(int((m.weight == 0).sum()) for n, m in sparse.named_modules() if n in layers)
    total = sum(m.weight.numel() for n, m in sparse.named_modules() if n in layers)
    assert zeros / total >= 0.79

    dense_path = quantize.export_float_onnx(model, example, tmp_path / "dense.onnx")
    sparse_path = quantize.export_float_onnx(sparse, example, tmp_path / "sparse.onnx")
    raw_dense, raw_sparse = measure.file_size(dense_path), measure.file_size(sparse_path)
    assert abs(raw_sparse - raw_dense) / raw_dense < 0.01  # zeros cost as much as any float
    assert measure.zipped_size(sparse_path) < 0.5 * measure.zipped_size(dense_path)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _layer_weight(arrays: dict[str, np.ndarray], layer: str) -> np.ndarray:
    names = [n for n in arrays if n.startswith(f"{layer}.weight") and arrays[n].ndim == 4]
    assert len(names) == 1, (layer, sorted(arrays))
    return arrays[names[0]]


def test_planned_zeros_survive_the_fine_tune_into_the_file(demo_task, tmp_path: Path) -> None:
    """50% sparsity planned on a float and on an int8 layer: after a QAT + KD fine-tune that
    changes every other weight, the exported file holds exactly the planned zeros (before
    the masks, 50% zeros became 0% after 3 fine-tune steps)."""
    plan = CompressionPlan(bits={"block1.conv2": 8}, activation_bits=8,
                           sparsity={"block1.conv1": 0.5, "block1.conv2": 0.5},
                           finetune_steps=12, learning_rate=5e-3)
    student = build_student(demo_task, plan, 8)
    before = student.block1.conv1.weight.detach().clone()
    calibration = [x for x, _ in itertools.islice(demo_task.data.batches("train", 32), 2)]
    qat = quantize.calibrate(quantize.prepare_qat(student, plan), calibration)
    distill.finetune(qat, demo_task.model, demo_task.data, plan, batch_size=32, seed=0)
    after = qat.block1.conv1.weight.detach()
    kept = before != 0
    assert not torch.equal(after[kept], before[kept])  # the fine-tune did train the layer
    path = quantize.export_onnx(qat.eval(), demo_task.data.example_input(1),
                                tmp_path / "m.onnx", plan, calibration).path

    arrays = _initializers(path)
    float_w, int8_w = _layer_weight(arrays, "block1.conv1"), _layer_weight(arrays, "block1.conv2")
    assert float_w.dtype == np.float32 and int8_w.dtype == np.int8
    planned = round(0.5 * float_w.size)
    assert int((float_w == 0).sum()) == planned
    # int8: the planned zeros, plus at most a few weights that round to 0 on their own
    assert planned <= int((int8_w == 0).sum()) <= planned + int8_w.size // 100


def test_global_sparsity_ranks_weights_across_layers(demo_task) -> None:
    model = sparsity.apply_global(demo_task.model, 0.6)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert zeros == round(0.6 * total)
    shares = [sparsity.zero_fraction(m.weight) for m in layers]
    assert max(shares) - min(shares) > 0.1  # not the same fraction in every layer
    assert sum(int((m.weight == 0).sum()) for m in demo_task.model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))) == 0  # teacher untouched
