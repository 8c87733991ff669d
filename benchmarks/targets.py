"""The same files on two CPU runtimes: ONNX Runtime and OpenVINO (issue 17).

    python benchmarks/targets.py                   # resnet18, mobilenet_v3_small, ResNet-20
    python benchmarks/targets.py --models resnet20 --repeats 10   # a quicker look

For each model: the fp32 file, uniform int8 (QDQ, uint8 activations), int4 weight-only
(integer weights in the file, float activations) and every prunable group pruned 50% at int8,
exported once; each file timed on ``onnxruntime-cpu`` and on ``openvino-cpu``, interleaved
with that runtime's own fp32 run of the same fp32 file (1 thread, batch 1). The table gives
latency as a ratio to fp32 on the same runtime and the fp32 milliseconds, so it shows when a
target changes which compression pays. Latency does not depend on weight values, so the
torchvision models carry random weights (no download); ResNet-20 is the shared teacher.
Writes benchmarks/results/targets.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    MODEL_SPEC,
    RESULTS,
    TEACHER,
    machine_state,
    md_table,
    state_line,
    write_json,
    write_text,
)

MODELS = {"resnet18": ("torchvision:resnet18", None, 224),
          "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", None, 224),
          "resnet20": (MODEL_SPEC, str(TEACHER), 32)}
TARGETS = ("onnxruntime-cpu", "openvino-cpu")


def _files(spec: str, weights: str | None, size: int, folder: Path) -> dict[str, Path]:
    import torch

    from autocompress import intake
    from autocompress.model.plan import CompressionPlan
    from autocompress.transform import quantize
    from autocompress.transform.prune import prune
    from autocompress.transform.survey import build_inventory

    model = intake.load_model(spec, weights, num_classes=10 if weights else None,
                              input_size=size).eval()
    example = torch.randn(1, 3, size, size)
    calibration = [torch.randn(4, 3, size, size)]
    inventory = build_inventory(model, example)
    layers = inventory.quantizable_layers()
    groups = [g.name for g in inventory.groups if g.prunable]
    int8 = CompressionPlan(bits={n: 8 for n in layers}, activation_bits=8)
    int4 = CompressionPlan(bits={n: 4 for n in layers}, activation_bits=32)
    pruned_plan = CompressionPlan(bits=int8.bits, prune={g: 0.5 for g in groups})
    files = {"fp32": quantize.export_float_onnx(model, example, folder / "fp32.onnx")}
    files["int8"] = quantize.export_onnx(model, example, folder / "int8.onnx", int8,
                                         calibration).path
    files["int4 weight-only"] = quantize.export_onnx(model, example, folder / "int4.onnx", int4,
                                                     calibration).path
    pruned = prune(model, pruned_plan, example)
    files["pruned 50% + int8"] = quantize.export_onnx(pruned, example, folder / "p8.onnx",
                                                      pruned_plan, calibration).path
    return files


def _time(files: dict[str, Path], size: int, target: str, rounds: int,
          repeats: int) -> dict[str, dict[str, float]]:
    from autocompress.runtime import sessions, timing

    out: dict[str, dict[str, float]] = {}
    shape = (1, 3, size, size)
    for name, path in files.items():
        options: dict[str, str] = {}
        if target == "onnxruntime-cpu" and sessions.has_qdq(path):
            options, _ = timing.pick_session_options(path, shape, threads=1, rounds=2,
                                                      repeats=5)
        inter = timing.time_interleaved(path, files["fp32"], shape, threads=1,
                                         candidate_options=options, rounds=rounds,
                                         repeats=repeats, target=target)
        out[name] = {"ratio": inter.ratio, "ms": inter.candidate.median_ms,
                     "fp32_ms": inter.reference.median_ms}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from autocompress.runtime import sessions

    for target in TARGETS:
        sessions.check_target(target)
    state = machine_state(ort_threads=1, torch_threads=1)
    print(f"targets benchmark: {state_line(state)}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="autocompress-targets-") as tmp:
        for model in args.models:
            spec, weights, size = MODELS[model]
            folder = Path(tmp) / model
            folder.mkdir()
            files = _files(spec, weights, size, folder)
            results[model] = {t: _time(files, size, t, args.rounds, args.repeats)
                              for t in TARGETS}
            print(f"{model}: {results[model]}", flush=True)
    rows = []
    for model, by_target in results.items():
        for kind in by_target[TARGETS[0]]:
            cells = [f"{by_target[t][kind]['ratio']:.2f}" for t in TARGETS]
            fp32 = [f"{by_target[t][kind]['fp32_ms']:.3g}" for t in TARGETS]
            rows.append([model, kind, *cells, *fp32])
    data = {"command": "python benchmarks/targets.py " + " ".join(sys.argv[1:]),
            "machine": state_line(state), "results": results}
    write_json(RESULTS / "targets.json", data)
    text = "\n".join([
        "# The same files on ONNX Runtime and OpenVINO (CPU)", "",
        f"Generated by `{data['command']}`.", "",
        f"**Conditions:** {data['machine']}.", "",
        "Latency as a ratio to the fp32 file on the same runtime (interleaved, median; < 1 is "
        "faster), and the fp32 milliseconds the ratio is against.", "",
        md_table(["model", "file", "ORT ratio", "OpenVINO ratio", "ORT fp32 ms",
                  "OpenVINO fp32 ms"], rows), "",
    ])
    write_text(RESULTS / "targets.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
