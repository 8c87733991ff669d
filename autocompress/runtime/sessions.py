"""Opening an exported file on a target: ONNX Runtime sessions with explicit threads and
session options (or OpenVINO's compiled model), the check that a target can run here, and
the record of those settings that a latency figure is reproduced with.

Part of the ONNX Runtime adapter, which is ``runtime`` (sessions here and in ``tensorrt``,
scoring, timing) plus ``transform/quantize/ort_tools.py`` (ONNX Runtime's quantization
tools); no other module imports ``onnxruntime``, so the rest of the package stays importable
and testable without it, and every runtime knob we set is visible in these few places. Every
figure the search records is measured on the file the user will get (design rule 1), with
explicit threads and session options (rule 3).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from autocompress.config.options import TARGETS as config_targets
from autocompress.errors import InputError, ModelSpecError, one_line
from autocompress.runtime import executorch as executorch_runtime
from autocompress.runtime import tensorrt as tensorrt_engine
from autocompress.runtime.cpu import cpu_has_vnni, cpu_model

PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
# Where a study's files are timed and scored (``--target``): ONNX Runtime on the CPU, OpenVINO
# on the CPU (the same ONNX files), ExecuTorch's XNNPACK backend (the .pte program made
# beside each ONNX file: runtime/executorch.py), or the GPU runtimes through ONNX Runtime's CUDA and
# TensorRT execution providers (they need onnxruntime-gpu and an NVIDIA GPU).
TARGETS: tuple[str, ...] = config_targets
DEFAULT_TARGET = "onnxruntime-cpu"
_GPU_PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
DEFAULT_THREADS = 2
# Folds weight DequantizeLinear into float weights at load. Helps int4 (weights would be
# dequantized on every run otherwise), hurts int8 (loses the integer kernels): so it is a
# per-file choice made by measurement, see timing.pick_session_options.
DISABLE_QDQ_OPTION: dict[str, str] = {"session.disable_quant_qdq": "1"}


def check_target(target: str) -> None:
    """Raise a one-line InputError when ``target`` is unknown or cannot run here."""
    if target not in TARGETS:
        raise InputError(f"target {target!r} is unknown; use one of {list(TARGETS)}")
    if target == executorch_runtime.TARGET:
        reason = executorch_runtime.unavailable_reason()
        if reason is not None:
            raise InputError(f"the {target} target needs ExecuTorch's runtime ({reason}): "
                             f"{executorch_runtime.INSTALL_HINT}, or use --target onnxruntime-cpu")
    if target == "openvino-cpu":
        from autocompress.runtime import openvino as openvino_runtime

        if not openvino_runtime.available():
            raise InputError("the openvino-cpu target needs OpenVINO: "
                             f"{openvino_runtime.INSTALL_HINT}")
    providers = _GPU_PROVIDERS.get(target)
    if providers and providers[0] not in ort.get_available_providers():
        raise InputError(
            f"the {target} target needs an NVIDIA GPU and ONNX Runtime's {providers[0]} "
            f"(this machine's ONNX Runtime offers {ort.get_available_providers()}); run it "
            "where `pip install onnxruntime-gpu` sees a GPU, or use --target onnxruntime-cpu"
        )


def make_session(
    path: str | os.PathLike[str],
    *,
    threads: int = DEFAULT_THREADS,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
    profile_prefix: str | None = None,
) -> Any:
    """A session for ``target`` with explicit threads (ONNX Runtime: sequential execution
    and full graph optimization; OpenVINO: one stream, latency hint).

    ``session_options`` are session config entries (e.g. ``{"session.disable_quant_qdq": "1"}``);
    for OpenVINO, compile properties. ``profile_prefix``: ONNX Runtime writes its profiler's
    trace there (``session.end_profiling()`` returns the file).
    """
    if threads < 1:
        raise InputError(f"threads={threads} must be >= 1; use e.g. --threads 2")
    if target == executorch_runtime.TARGET:  # the .pte program beside (or at) ``path``
        check_target(target)
        return executorch_runtime.ExecuTorchSession(path, threads=threads,
                                                    options=session_options)
    model_path = Path(path)
    if not model_path.is_file():
        raise InputError(f"ONNX file {str(model_path)!r} does not exist; export the model first")
    if target != DEFAULT_TARGET:
        check_target(target)
    if target == "openvino-cpu":
        from autocompress.runtime.openvino import OpenVINOSession

        return OpenVINOSession(model_path, threads=threads, options=session_options)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One op at a time with a fixed thread pool: the steadiest numbers on a shared machine.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; ORT warns about e.g. unused initializers
    for key, value in (session_options or {}).items():
        options.add_session_config_entry(str(key), str(value))
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if target == "tensorrt":  # the builder flags every session of the target shares
        try:
            qdq = has_qdq(model_path)
        except Exception as exc:  # onnx cannot parse it: not an ONNX file
            raise _not_onnx(model_path, one_line(exc, typed=True)) from None
        providers = tensorrt_engine.providers(qdq)
    else:
        providers = list(_GPU_PROVIDERS.get(target, PROVIDERS))
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except (_ORT_ERRORS.InvalidProtobuf, _ORT_ERRORS.InvalidArgument, _ORT_ERRORS.Fail) as exc:
        if not _load_failed(exc):
            raise  # the file loaded: a session problem, not a wrong file
        raise _not_onnx(model_path, _ort_reason(exc)) from None


# ONNX Runtime's load failures: garbage bytes are InvalidProtobuf, an empty or graphless
# protobuf InvalidArgument, a protobuf that is no ONNX model Fail; all say "Load model from".
_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state


def _load_failed(exc: BaseException) -> bool:
    return isinstance(exc, _ORT_ERRORS.InvalidProtobuf) or "Load model from" in str(exc)


def _ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's reason after its "Load model from <path> failed:" prefix, one line."""
    text = " ".join(str(exc).split())
    return text.rpartition("failed:")[2].strip() or type(exc).__name__


def _not_onnx(path: Path, reason: str) -> ModelSpecError:
    return ModelSpecError(
        f"{str(path)!r} is not an ONNX model ONNX Runtime can load ({reason[:120]}); pass an "
        ".onnx file exported by autocompress export or torch.onnx.export"
    )


def input_name(session: Any) -> str:
    """The name of the session's one input (a one-line InputError for more than one)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise InputError(f"ONNX model has inputs {names}; autocompress handles one image input")
    return inputs[0].name


def input_shape_of(path: str | os.PathLike[str]) -> list[int] | None:
    """The file's input shape without the batch dimension; None when a dimension is symbolic."""
    dims = make_session(path).get_inputs()[0].shape[1:]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None


def has_qdq(path: str | os.PathLike[str]) -> bool:
    """Whether the file holds any DequantizeLinear node (else QDQ session options are moot)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == "DequantizeLinear" for node in model.graph.node)


def runtime_info(
    threads: int,
    batch_size: int,
    session_options: Mapping[str, str] | None = None,
    target: str = DEFAULT_TARGET,
) -> dict[str, Any]:
    """What a user needs to reproduce a latency figure (JSON-serialisable)."""
    if target == executorch_runtime.TARGET:
        engine = {"runtime": "executorch", "version": executorch_runtime.version(),
                  "providers": ["XnnpackBackend"], "program": executorch_runtime.PROGRAM_SUFFIX}
    elif target == "openvino-cpu":
        from autocompress.runtime import openvino as openvino_runtime

        engine = {"runtime": "openvino", "version": openvino_runtime.version(),
                  "providers": ["CPU"]}
    else:
        engine = {"runtime": "onnxruntime", "version": ort.__version__,
                  "providers": list(_GPU_PROVIDERS.get(target, PROVIDERS))}
        if target == "tensorrt":
            engine["builder_flags"] = dict(tensorrt_engine.FLAGS_RULE)
    return {
        "target": target,
        **engine,
        "session_options": dict(session_options or {}),
        "threads": int(threads),
        "inter_op_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization": "all",
        "batch_size": int(batch_size),
        "cpu": cpu_model(),
        "cpu_vnni": cpu_has_vnni(),  # False on x86 -> int8 weights are range-reduced (63)
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
