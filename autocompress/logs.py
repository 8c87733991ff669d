"""How the command line logs: our own lines at INFO on stderr, third-party chatter only
with ``-v`` (``cli`` calls ``quiet_libraries`` once per command)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

log = logging.getLogger("autocompress")

# Libraries that log through the root logger from inside their own code: ONNX Runtime's
# quantizer writes ~30 "Axis 1 is out-of-range for weight ..." warnings per trial on
# convnext_tiny with logging.warning(). Their warnings are shown with -v; errors always.
_NOISY_PACKAGES = ("onnxruntime", "onnxscript", "onnx", "torch", "fvcore", "torch_pruning")


def library_noise(record: logging.LogRecord) -> bool:
    """False (drop) for a library's record below ERROR that is not one of ours."""
    if record.levelno >= logging.ERROR or record.name.startswith("autocompress"):
        return True
    parts = Path(record.pathname).parts
    return not any(package in parts for package in _NOISY_PACKAGES)


def quiet_libraries(*, verbose: bool) -> None:
    """Our own log lines at INFO on stderr; third-party chatter (ONNX Runtime's quantizer INFO
    lines, Optuna's experimental-feature and torch's deprecation warnings) only with -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(library_noise)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*experimental.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
