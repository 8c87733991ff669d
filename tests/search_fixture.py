"""One short real search on the digits demo, shared by the tests that read a study.

Built once per test run (conftest.py ``short_study``: one search, even with several
pytest-xdist workers) and copied for each worker with ``copy_short_study``; tests that need a
study of their own call ``run_short_search`` with their own folder.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from autocompress.config.options import SearchConfig
from autocompress.search.loop import SearchResult, run_search

# Few, short trials: enough for a front with baselines, rejections need a tight budget.
SHORT = {
    "trials": 4,
    "finetune_steps": 30,
    "latency_repeats": 6,
    "seed": 0,
}


@dataclass(frozen=True)
class ShortStudy:
    storage_url: str
    study: str
    artifacts_dir: Path
    db_path: Path
    result: SearchResult


def run_short_search(folder: Path, *, study: str = "t", **changes: object) -> ShortStudy:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / f"{study}.db"
    url = f"sqlite:///{db}"
    values = {**SHORT, "study": study, "storage": url, "budgets": ("50ms",), **changes}
    result = run_search(SearchConfig(**values))  # type: ignore[arg-type]
    return ShortStudy(url, study, Path(result.artifacts_dir), db, result)


def copy_short_study(study: ShortStudy, folder: Path) -> ShortStudy:
    """The same study in ``folder``: its SQLite file and its artifact folder beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / study.db_path.name
    shutil.copyfile(study.db_path, db)
    artifacts = folder / study.artifacts_dir.name
    shutil.copytree(study.artifacts_dir, artifacts)
    url = f"sqlite:///{db}"
    result = dataclasses.replace(study.result, storage_url=url, artifacts_dir=str(artifacts))
    return ShortStudy(url, study.study, artifacts, db, result)
