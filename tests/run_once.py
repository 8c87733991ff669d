"""Expensive test fixtures built once per test run, even with several pytest-xdist workers.

Under xdist every worker is its own pytest session, so a session fixture is built once per
worker. ``shared_root`` is a folder all workers of one run share (the controller's basetemp,
the parent of each worker's own basetemp); ``once`` builds a value there under a file lock:
the first worker builds it and pickles it, the others wait for the lock and read the pickle.
Without xdist (``-p no:xdist`` or ``-n 0``) the run has one process and this is a plain cache.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock  # a dependency of torch, so always installed with it

T = TypeVar("T")


def under_xdist() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def shared_root(factory: pytest.TempPathFactory) -> Path:
    """A folder shared by every process of this test run (and by this run only)."""
    base = factory.getbasetemp()
    return base.parent if under_xdist() else base


def once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)`` run by one process of the run; the others get its pickled result.

    A build that raises leaves no result behind, so the next worker tries again (and fails
    with its own traceback, in its own tests).
    """
    root = shared_root(factory)
    folder = root / name
    done = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if done.is_file():
            return pickle.loads(done.read_bytes())  # written by this run's own workers
        folder.mkdir(parents=True, exist_ok=True)
        value = build(folder)
        tmp = done.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(value))
        tmp.replace(done)
        return value
