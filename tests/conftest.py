"""Shared fixtures.

``autocompress_cache`` points ``AUTOCOMPRESS_CACHE`` at a fresh session folder (autouse), so
no test reads or writes the user's ~/.cache/autocompress. ``demo_task`` is the built-in demo
(trained DemoNet on seeded digits splits), loaded once per session: treat its model as
read-only (``copy.deepcopy`` it before changing anything).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # torch is imported only by tests that ask for the demo
    from autocompress.intake import Task


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny test models run fastest on one thread, and a 2-core CI box shared by ONNX Runtime
    sessions and test subprocesses slows down badly under thread oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def autocompress_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("autocompress-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOCOMPRESS_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def demo_task(autocompress_cache: Path) -> Task:
    from autocompress.intake import load_task

    return load_task(None, None, None)


@pytest.fixture(scope="session")
def short_study(autocompress_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short real search on the digits demo (baselines + a few trials), shared read-only
    by the tests that inspect a study: search records, export, dashboard."""
    from tests.search_fixture import run_short_search

    return run_short_search(tmp_path_factory.mktemp("short-study"))
