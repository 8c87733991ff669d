"""One short real search on the digits demo, shared by the tests that read a study.

Built once per test session (and per pytest-xdist worker) under a temporary folder; tests
that need a study of their own call ``run_short_search`` with their own folder.
"""

from __future__ import annotations

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
