"""ExecuTorch adapter, runtime side: the only module that loads and runs ``.pte`` programs
through ExecuTorch's Python runtime bindings (``executorch.runtime``, an optional extra).

For the ``executorch-xnnpack`` target a candidate is a pair of files made from the same
PyTorch model: ``X.onnx`` (kept: ONNX tools, export's ``model.onnx``) and ``X.pte`` beside it,
the ExecuTorch program lowered to the XNNPACK backend (``transform/quantize/executorch_lower``).
Every session of the target opens the ``.pte`` (``program_path``), so the pre-check, the
timing against the fp32 program and the accuracy are all the program's (design rule 1).

``ExecuTorchSession`` offers the two calls ``runtime`` makes on an ONNX Runtime session
(``get_inputs`` and ``run``), so timing, interleaving and scoring are one code path for every
target. A program has a fixed input shape (the batch it was lowered at, the latency batch):
``run`` feeds larger batches through it in chunks of that size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autocompress.errors import InputError, ModelSpecError, one_line

TARGET = "executorch-xnnpack"
PROGRAM_SUFFIX = ".pte"
INSTALL_HINT = "pip install 'autocompress[executorch]'"
# The trial attributes that carry a candidate's program (beside the ONNX artifact's): its
# stored copy and checksum, and what it holds (weight and activation types per layer, notes).
ARTIFACT_ID_ATTR = "executorch_artifact_id"
ARTIFACT_SHA256_ATTR = "executorch_artifact_sha256"
PROGRAM_ATTR = "executorch_program"
# c10::ScalarType codes of integer inputs (token ids): Byte, Char, Short, Int, Long
_INTEGER_SCALAR_TYPES = frozenset({0, 1, 2, 3, 4})


@dataclass(frozen=True)
class _Input:
    name: str
    type: str = "tensor(float)"  # ONNX Runtime's spelling, which timing.py reads


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why ExecuTorch's runtime cannot run here (None when it can): not installed, or its
    native bindings fail to load on this machine (e.g. a wheel built for another CPU/libc)."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        return "executorch is not installed"
    try:
        from executorch.runtime import Runtime

        Runtime.get()
    except Exception as exc:  # a broken native extension raises ImportError/OSError/...
        return f"ExecuTorch's runtime bindings do not load here ({one_line(exc, typed=True)})"
    return None


def available() -> bool:
    return unavailable_reason() is None


def version() -> str | None:
    if not available():
        return None
    from importlib.metadata import version as dist_version

    return dist_version("executorch")


def program_path(path: str | os.PathLike[str]) -> Path:
    """The ExecuTorch program of a candidate: ``path`` itself when it is a ``.pte``, else the
    ``.pte`` beside it (``model.onnx`` -> ``model.pte``)."""
    given = Path(path)
    return given if given.suffix == PROGRAM_SUFFIX else given.with_suffix(PROGRAM_SUFFIX)


def set_threads(threads: int) -> None:
    """XNNPACK's thread pool size. Process-wide in ExecuTorch: every session of a run uses
    the same ``--threads``, so the last setting is the one all timings ran with."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchSession:
    """A loaded ``.pte`` program's ``forward`` with ONNX Runtime's session interface (the
    subset used): ``get_inputs`` and ``run(None, {name: array})``."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int,
                 options: Mapping[str, str] | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise InputError(f"the {TARGET} target needs ExecuTorch ({reason}): {INSTALL_HINT}")
        if options:
            raise InputError(f"the {TARGET} target takes no session options; got {dict(options)}")
        program = program_path(path)
        if not program.is_file():
            raise InputError(f"ExecuTorch program {str(program)!r} does not exist; the "
                             f"{TARGET} target runs the .pte made beside each .onnx file")
        from executorch.runtime import Runtime

        set_threads(threads)
        try:
            self._method = Runtime.get().load_program(program).load_method("forward")
        except Exception as exc:  # not a program, or one this runtime cannot load
            raise ModelSpecError(f"{str(program)!r} is not an ExecuTorch program this runtime "
                                 f"can load ({one_line(exc, typed=True)[:120]})") from None
        meta = self._method.metadata
        if meta.num_inputs() != 1:
            raise InputError(f"ExecuTorch program has {meta.num_inputs()} inputs; autocompress "
                             "handles one input")
        tensor = meta.input_tensor_meta(0)
        self.input_shape = tuple(int(d) for d in tensor.sizes())
        integer = int(tensor.dtype()) in _INTEGER_SCALAR_TYPES
        self._input = _Input("input", "tensor(int64)" if integer else "tensor(float)")

    def get_inputs(self) -> list[_Input]:
        return [self._input]

    def run(self, _outputs: Sequence[str] | None, feed: Mapping[str, Any]) -> list[np.ndarray]:
        """The program's first output for every sample of the one input, fed in chunks of the
        program's batch (a short last chunk padded with zeros, its padding dropped)."""
        import torch

        x = np.ascontiguousarray(next(iter(feed.values())))
        batch = self.input_shape[0] if self.input_shape else 1
        if x.shape == self.input_shape:  # the timed case: one call, no copies
            return [self._method.execute([torch.from_numpy(x)])[0].numpy()]
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise InputError(f"input of shape {list(x.shape)} does not fit the ExecuTorch "
                             f"program's {list(self.input_shape)}")
        outs = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            real = chunk.shape[0]
            if real < batch:
                pad = np.zeros((batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self._method.execute([torch.from_numpy(np.ascontiguousarray(chunk))])[0]
            outs.append(out.numpy()[:real].copy())
        return [np.concatenate(outs)]
