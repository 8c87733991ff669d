"""Command-line parsers of the service (placeholder wiring until its owner fills it in)."""

from __future__ import annotations

from typing import Any


def add_parsers(sub: Any) -> None:
    """Add this module's commands to the top-level parser sub."""
