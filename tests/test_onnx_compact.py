"""onnx_compact.py: smaller files that compute exactly what the uncompacted ones did."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from autocompress.intake import Task
from autocompress.model.plan import CompressionPlan
from autocompress.transform import quantize as q
from autocompress.transform.onnx_compact import compact_graph
from autocompress.transform.quantize import onnx_float, onnx_qdq, onnx_weight_only


def _export(task: Task, bits: int, path: Path) -> Path:
    model = copy.deepcopy(task.model)
    layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
    calibration = [x for x, _ in itertools.islice(task.data.batches("train", 32), 2)]
    plan = CompressionPlan(bits={name: bits for name in layers})
    return q.export_onnx(model, task.data.example_input(1), path, plan, calibration).path


def _optimized_ops(path: Path, tmp: Path) -> Counter[str]:
    """Op types after ONNX Runtime's graph optimizations (QDQ groups fused or not)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_exported_file_is_smaller_and_computes_the_same(
    bits: int, demo_task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        # every step of the export that writes the compact layout
        for step in (onnx_qdq, onnx_weight_only, onnx_float):
            patch.setattr(step, "compact_graph", lambda proto: None)
        plain = _export(demo_task, bits, tmp_path / "plain.onnx")
    compact = _export(demo_task, bits, tmp_path / "compact.onnx")

    # Demo CNN: 131.7 -> 121.7 KB at int8 (names are a fixed cost; small models feel it).
    assert compact.stat().st_size < 0.95 * plain.stat().st_size
    batches = itertools.islice(demo_task.data.batches("val", 64), 2)
    x = np.concatenate([b.numpy() for b, _ in batches])
    np.testing.assert_array_equal(_outputs(compact, x), _outputs(plain, x))
    # The same kernels run: ORT fuses the same QDQ groups (QLinearConv at int8).
    assert _optimized_ops(compact, tmp_path) == _optimized_ops(plain, tmp_path)
    # Layers are still found from the weights' names, with the widths the plan asked for.
    assert q.onnx_weight_types(compact) == q.onnx_weight_types(plain)

    graph = onnx.load(str(compact)).graph
    assert not graph.value_info
    assert all(not node.name for node in graph.node)
    assert [i.name for i in graph.input] == ["input"]
    initializers = {i.name: i for i in graph.initializer}
    int32_dq = [
        n for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in initializers
        and initializers[n.input[0]].data_type == TensorProto.INT32
    ]
    assert int32_dq and all(len(n.input) == 2 for n in int32_dq)


def test_float_reference_is_compacted_too(demo_task: Task, tmp_path: Path) -> None:
    """The fp32 file that sizes are compared against pays the same small overhead."""
    example = demo_task.data.example_input(1)
    path = q.export_float_onnx(demo_task.model, example, tmp_path / "f.onnx")
    graph = onnx.load(str(path)).graph
    assert all(not node.name for node in graph.node)
    inner = {o for n in graph.node for o in n.output} - {o.name for o in graph.output}
    assert inner and all(name.startswith("t") and name[1:].isdigit() for name in inner)


def _tiny_graph(zero_point: list[int]) -> onnx.ModelProto:
    bias = numpy_helper.from_array(np.array([3, -5], dtype=np.int32), "b_quantized")
    scale = numpy_helper.from_array(np.array([0.5, 0.25], dtype=np.float32), "b_scale")
    zp = numpy_helper.from_array(np.array(zero_point, dtype=np.int32), "b_zero_point")
    nodes = [
        helper.make_node("DequantizeLinear", ["b_quantized", "b_scale", "b_zero_point"],
                         ["a_long_intermediate_name"], name="dq", axis=0),
        helper.make_node("Add", ["x", "a_long_intermediate_name"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[bias, scale, zp],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_nonzero_int32_zero_point_is_kept() -> None:
    proto = _tiny_graph([1, 0])
    stats = compact_graph(proto)
    assert stats.dropped_zero_points == 0
    assert proto.graph.node[0].input[2] == "b_zero_point"


def test_zero_int32_zero_point_is_dropped_with_its_initializer(tmp_path: Path) -> None:
    proto = _tiny_graph([0, 0])
    before = _run(proto, tmp_path / "before.onnx")
    stats = compact_graph(proto)
    assert stats.dropped_zero_points == 1
    assert "b_zero_point" not in {i.name for i in proto.graph.initializer}
    assert stats.renamed_tensors == 1 and proto.graph.node[1].input[1] == "t0"
    np.testing.assert_array_equal(_run(proto, tmp_path / "after.onnx"), before)


def _run(proto: onnx.ModelProto, path: Path) -> np.ndarray:
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return _outputs(path, np.array([1.0, 2.0], dtype=np.float32))


def test_short_names_never_collide_with_kept_names() -> None:
    """A graph input already called "t0" keeps its name; the intermediate takes another."""
    nodes = [
        helper.make_node("Relu", ["t0"], ["hidden"]),
        helper.make_node("Neg", ["hidden"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    compact_graph(proto)
    assert proto.graph.node[0].input[0] == "t0"
    assert proto.graph.node[0].output[0] == proto.graph.node[1].input[0] == "t1"
    onnx.checker.check_model(proto)


def test_graphs_with_subgraphs_keep_their_tensor_names_and_initializers(
    tmp_path: Path,
) -> None:
    """If/Loop bodies name outer tensors: renaming them, or dropping an initializer only a
    body reads, would break the body."""
    body = [helper.make_node("DequantizeLinear", ["b_quantized", "b_scale", "b_zero_point"],
                             ["bias"], axis=0),
            helper.make_node("Add", ["outer_tensor", "bias"], ["out"])]
    branch = helper.make_graph(
        body, "branch", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])]
    )
    proto = _tiny_graph([0, 0])
    graph = proto.graph
    del graph.node[:]
    graph.node.extend([
        helper.make_node("Relu", ["x"], ["outer_tensor"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
    ])
    graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    stats = compact_graph(proto)
    assert stats.renamed_tensors == 0 and stats.dropped_zero_points == 0
    assert graph.node[0].output[0] == "outer_tensor"
    assert "b_zero_point" in {i.name for i in graph.initializer}
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "if.onnx"))
    session = ort.InferenceSession(str(tmp_path / "if.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], dtype=np.float32)
    (y,) = session.run(None, {"x": x, "cond": np.array(True)})
    np.testing.assert_array_equal(y, [1.5, 0.75])  # relu(x) + [3 * 0.5, -5 * 0.25]
