"""The tensorrt target's builder flags and serialized engines: the one adapter for TensorRT,
reached through ONNX Runtime's TensorRT execution provider (``onnxruntime-gpu``).

Builder flags, the same for every session of the target (timing, scoring, export), so a
latency or accuracy recorded for a file is the engine's:

- ``trt_fp16_enable``: TensorRT may run any layer in fp16 where that is faster (it keeps
  fp32 where not); the accuracy recorded is measured with it;
- ``trt_int8_enable`` for files with QDQ nodes: explicit quantization, TensorRT reads the
  Q/DQ nodes' scales (no calibration table; without the flag a QDQ file's integer layers
  would not build as int8).

``save_engine`` builds the engine of an exported file for batch 1 through the provider's
engine cache into a folder beside ``model.onnx`` (``tensorrt/``: the ``.engine`` and its
``.profile``, plus ``build.json`` naming the flags and versions). An engine is specific to
the GPU (compute capability) and TensorRT version that built it: a deployment on another GPU
rebuilds it from ``model.onnx`` with the same flags.

Nothing here can run without an NVIDIA GPU; ``runtime.sessions.check_target`` refuses the target in
one line first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PROVIDER = "TensorrtExecutionProvider"
ENGINE_FOLDER = "tensorrt"


# The rule, in words, for the runtime info every trial records
FLAGS_RULE: dict[str, bool | str] = {"fp16": True, "int8": "files with QDQ nodes"}


def builder_flags(qdq: bool) -> dict[str, bool]:
    """fp16 always allowed; int8 for files with QDQ nodes (explicit quantization)."""
    return {"fp16": bool(FLAGS_RULE["fp16"]), "int8": bool(qdq)}


def provider_options(qdq: bool, engine_dir: Path | None = None) -> dict[str, str]:
    """The TensorRT provider's options for a file (``qdq``: it holds QDQ nodes); with
    ``engine_dir`` the built engine is also written there (the provider's engine cache)."""
    flags = builder_flags(qdq)
    options = {"trt_fp16_enable": str(flags["fp16"]), "trt_int8_enable": str(flags["int8"])}
    if engine_dir is not None:
        options.update({"trt_engine_cache_enable": "True",
                        "trt_engine_cache_path": str(engine_dir)})
    return options


def providers(qdq: bool, engine_dir: Path | None = None) -> list[Any]:
    """TensorRT first (with the flags), CUDA for what TensorRT does not take, then CPU."""
    return [(PROVIDER, provider_options(qdq, engine_dir)), "CUDAExecutionProvider",
            "CPUExecutionProvider"]


def save_engine(onnx_path: Path, folder: Path, input_shape: tuple[int, ...],
                qdq: bool) -> list[str]:
    """Build ``onnx_path``'s engine for batch 1 into ``folder/tensorrt`` (``qdq``: the file
    holds QDQ nodes); the written files' names relative to ``folder`` (``build.json``
    last)."""
    import onnxruntime as ort

    engine_dir = folder / ENGINE_FOLDER
    engine_dir.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(str(onnx_path), providers=providers(qdq, engine_dir))
    if PROVIDER not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime did not load {PROVIDER} for {onnx_path.name} "
                           f"(it used {session.get_providers()}); no engine was built")
    first = session.get_inputs()[0]
    shape = (1, *input_shape)
    feed = (np.ones(shape, dtype=np.int64) if "int" in str(first.type)
            else np.zeros(shape, dtype=np.float32))
    session.run(None, {first.name: feed})  # the engine is built (and cached) on first run
    written = sorted(p.name for p in engine_dir.iterdir() if p.is_file())
    if not any(name.endswith(".engine") for name in written):
        raise RuntimeError(f"TensorRT wrote no engine for {onnx_path.name} into {engine_dir}")
    build = {"flags": builder_flags(qdq), "batch": 1, "input_shape": list(input_shape),
             "onnxruntime": ort.__version__, "engines": written,
             "note": "engines are specific to this GPU and TensorRT version; elsewhere build "
                     "from model.onnx with the same flags"}
    (engine_dir / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    return [f"{ENGINE_FOLDER}/{name}" for name in [*written, "build.json"]]


__all__ = ["ENGINE_FOLDER", "FLAGS_RULE", "PROVIDER", "builder_flags", "provider_options",
           "providers", "save_engine"]
