"""Shared fixtures.

``autocompress_cache`` points ``AUTOCOMPRESS_CACHE`` at a fresh folder of this test run
(autouse), so no test reads or writes the user's ~/.cache/autocompress. ``demo_task`` is the
built-in demo (trained DemoNet on seeded digits splits), loaded once per session: treat its
model as read-only (``copy.deepcopy`` it before changing anything). ``short_study`` is one
short real search, shared read-only.

The suite runs on pytest-xdist workers (``pytest_cmdline_main`` below). The expensive shared
things are made once per run, not once per worker (tests/run_once.py): the demo teacher is
trained by the first worker that needs it into the cache folder all workers share, and the
short search runs once; each worker then reads its own copy of that study.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.run_once import once, shared_root, under_xdist

if TYPE_CHECKING:  # only for annotations: the fixtures import what they build
    from autocompress.intake import Task
    from tests.search_fixture import ShortStudy


# Test folders in memory: every Optuna trial is dozens of SQLite commits, and on a disk each
# commit waits for an fsync (measured 11 ms a commit here, 0.05 ms on tmpfs): a short search
# spent a third of its time in fsync. Only where the tests' temporary files go changes; set
# PYTEST_DEBUG_TEMPROOT (pytest's own setting) to choose another folder.
# A run writes ~150 MB there (only failed tests' folders are kept, pyproject.toml), so a small
# /dev/shm (a container's default 64 MB) keeps the disk.
_RAM = Path("/dev/shm")
_RAM_NEEDED = 1 << 30
if ("PYTEST_DEBUG_TEMPROOT" not in os.environ and _RAM.is_dir() and os.access(_RAM, os.W_OK)
        and shutil.disk_usage(_RAM).free >= _RAM_NEEDED):
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_RAM)

# One torch thread per test process: the searches' default (--train-threads 0) follows
# OMP_NUM_THREADS, else takes every CPU, and xdist already runs a worker per core (tiny
# models gain nothing from more threads; oversubscribed workers lose a lot).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Workers for a plain `pytest` (CI runs the README's plain `pytest`): one per core, at most
# MAX_WORKERS. Set here rather than as `-n` in addopts so that `pytest -p no:xdist` still
# works; `pytest -n 0` runs in one process, `-n N` picks N workers.
MAX_WORKERS = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Runs before xdist's own hook of the same name (conftests register after plugins), which
    turns "auto" into a worker count. worksteal: each worker starts on a contiguous half of
    the tests (module fixtures built once) and idle workers take over queued tests."""
    if not config.pluginmanager.hasplugin("xdist") or under_xdist():
        return
    option = config.option
    if option.numprocesses is None and not option.usepdb and not option.collectonly:
        option.numprocesses = "auto"
        option.maxprocesses = option.maxprocesses or MAX_WORKERS
        if option.dist == "no":
            option.dist = "worksteal"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny test models run fastest on one thread, and a 2-core CI box shared by ONNX Runtime
    sessions, test subprocesses and two xdist workers slows down badly under thread
    oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def autocompress_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the whole run, shared by its xdist workers (the demo teacher and
    data sets are written there atomically, so concurrent writers never tear a file)."""
    path = shared_root(tmp_path_factory) / "autocompress-cache"
    path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOCOMPRESS_CACHE", str(path))
        yield path


def _train_demo(folder: Path) -> bool:
    from autocompress.intake import load_task

    load_task(None, None, None)  # trains into AUTOCOMPRESS_CACHE
    return True


@pytest.fixture(scope="session")
def demo_task(autocompress_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Task:
    from autocompress.intake import load_task

    once(tmp_path_factory, "demo-teacher", _train_demo)  # one worker trains, others wait
    return load_task(None, None, None)


@pytest.fixture(scope="session")
def short_study(demo_task: Task, tmp_path_factory: pytest.TempPathFactory) -> ShortStudy:
    """One short real search on the digits demo (baselines + a few trials), shared read-only
    by the tests that inspect a study: search records, export, dashboard. Searched once per
    run; every worker gets its own copy (some tests run refused searches on it, which take
    the SQLite file's one-worker lock for a moment)."""
    from tests.search_fixture import copy_short_study, run_short_search

    built = once(tmp_path_factory, "short-study", run_short_search)
    return copy_short_study(built, tmp_path_factory.mktemp("short-study"))
