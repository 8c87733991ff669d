"""A memory and time limit around one third-party analysis, so no model takes the machine down.

Torch-Pruning's dependency analysis grew a process to 24 GB on torchvision's swin_t (64x64
input) until the kernel's OOM killer ended it without a message. Inside ``limited`` the
process may grow by at most ``memory_bytes`` of address space (RLIMIT_AS, soft limit,
restored afterwards) and run for at most ``seconds`` (SIGALRM, main thread only, and only
when no one else's timer is armed, e.g. pytest-timeout's); going over raises
``ResourceLimitError`` with what was being done, which the caller turns into a fallback
(the model is searched without pruning) instead of a dead process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from autocompress.errors import AutocompressError

try:  # POSIX only: elsewhere the analysis runs unguarded
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

ENV_MEMORY_GB = "AUTOCOMPRESS_ANALYSIS_MEMORY_GB"
ENV_SECONDS = "AUTOCOMPRESS_ANALYSIS_SECONDS"
DEFAULT_MEMORY_GB = 6.0  # dependency graphs of resnet50/vit_b_16 need well under 1 GB
DEFAULT_SECONDS = 300.0


class ResourceLimitError(AutocompressError):
    """An analysis went over its memory or time limit (and was stopped)."""


def analysis_limits() -> tuple[int, float]:
    """(bytes, seconds) an analysis may use: the defaults or the environment's."""
    gb = float(os.environ.get(ENV_MEMORY_GB, DEFAULT_MEMORY_GB))
    seconds = float(os.environ.get(ENV_SECONDS, DEFAULT_SECONDS))
    return int(gb * 2**30), seconds


@contextlib.contextmanager
def limited(what: str, *, memory_bytes: int | None = None,
            seconds: float | None = None) -> Iterator[None]:
    """Run the body with at most ``memory_bytes`` more address space and ``seconds``."""
    restore_memory = _limit_memory(memory_bytes)
    restore_timer = _limit_time(seconds, what)
    try:
        yield
    except MemoryError:
        raise ResourceLimitError(f"{what} needed more than {_gb(memory_bytes)} of memory "
                                 "and was stopped") from None
    except RuntimeError as exc:  # torch's allocator: "DefaultCPUAllocator: can't allocate"
        if "allocate" not in str(exc):
            raise
        raise ResourceLimitError(f"{what} needed more than {_gb(memory_bytes)} of memory "
                                 "and was stopped") from None
    finally:
        restore_timer()
        restore_memory()


def _gb(n: int | None) -> str:
    return "the allowed" if n is None else f"{n / 2**30:.1f} GB more"


def _virtual_size() -> int | None:
    try:
        pages = int(open("/proc/self/statm").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(memory_bytes: int | None) -> Any:
    if resource is None or not memory_bytes:
        return lambda: None
    current = _virtual_size()
    if current is None:
        return lambda: None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = current + memory_bytes
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft <= wanted:
        return lambda: None  # a tighter limit is already in place
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _limit_time(seconds: float | None, what: str) -> Any:
    if (not seconds or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):  # someone else's timer
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise ResourceLimitError(f"{what} took longer than {seconds:g} s and was stopped")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def restore() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return restore


__all__ = ["ENV_MEMORY_GB", "ENV_SECONDS", "ResourceLimitError", "analysis_limits", "limited"]
