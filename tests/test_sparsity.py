"""Unstructured L1 sparsity: dense storage saves nothing, the zipped file does (honest sizes)."""

from __future__ import annotations

from pathlib import Path

from autocompress import measure, quantize
from autocompress.inventory import build_inventory
from autocompress.prune import apply_unstructured


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
