"""Facts about this machine's CPU that a latency figure is recorded with: its name and
whether it has int8 dot-product (VNNI) instructions."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's marketing name (recorded with every latency)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_has_vnni() -> bool | None:
    """VNNI (int8 dot product) present; None when the flags cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return None
