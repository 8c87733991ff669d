"""Does ONNX Runtime's int4 MatMulNBits kernel beat a float MatMul here? (issue 15)

    python benchmarks/matmul_nbits.py

One transformer-sized projection (K=384 -> N=1536, MiniLM's MLP), weights quantized to int4
per output column (what the search's weight-only int4 holds), run as ``MatMulNBits``
(block 32, symmetric) with accuracy level 0 (float compute) and 4 (int8 activations),
against the float ``MatMul`` of the same dequantized weights, at 1 row (decoding one token)
and 64 rows (a 64-token sequence, the latency shape of the text benchmark); 1 thread, runs
interleaved, medians. Writes benchmarks/results/matmul_nbits.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, machine_state, md_table, state_line, write_text

K, N, BLOCK, QMAX = 384, 1536, 32, 7
RUNS = 300


def _files(folder: Path) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    scale = np.abs(weight).max(axis=0) / QMAX
    q = np.clip(np.round(weight / scale), -QMAX, QMAX).astype(np.int8)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    files = {}
    dequantized = (q.astype(np.float32) * scale).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp", [x_info],
                              [y_info], [numpy_helper.from_array(dequantized, "w")])
    files["float MatMul"] = folder / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets[:1]), files["float MatMul"])
    blocks = K // BLOCK
    unsigned = (q.T + 8).astype(np.uint8).reshape(N, blocks, BLOCK)  # zero point 8
    packed = (unsigned[:, :, 0::2] | (unsigned[:, :, 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(scale[:, None], blocks, axis=1).astype(np.float32).reshape(-1)
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level)
        graph = helper.make_graph([node], "nbits", [x_info], [y_info],
                                  [numpy_helper.from_array(packed, "b"),
                                   numpy_helper.from_array(scales, "s")])
        name = f"int4 MatMulNBits, accuracy level {level}"
        files[name] = folder / f"nbits{level}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=opsets), files[name])
    return files


def main() -> int:
    import onnxruntime as ort

    state = machine_state(ort_threads=1, torch_threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(Path(tmp))
        sessions = {k: ort.InferenceSession(str(p), options) for k, p in files.items()}
        rng = np.random.default_rng(1)
        for rows in (1, 64):
            x = rng.standard_normal((rows, K)).astype(np.float32)
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(RUNS):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    times[name].append((time.perf_counter() - start) * 1e3)
            base = statistics.median(times["float MatMul"])
            for name, samples in times.items():
                median = statistics.median(samples)
                rows_out.append([rows, name, f"{median:.3f}", f"{base / median:.2f}x"])
    text = ("# int4 MatMulNBits vs float MatMul (ONNX Runtime CPU)\n\n"
            f"{state_line(state)}\n\n`python benchmarks/matmul_nbits.py`: K={K}, N={N}, "
            f"block {BLOCK}, {RUNS} interleaved runs, medians.\n\n"
            + md_table(["rows", "kernel", "ms", "speed vs float"], rows_out) + "\n")
    write_text(RESULTS / "matmul_nbits.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
