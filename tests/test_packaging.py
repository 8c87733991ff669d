"""Packaging: what the Docker image leaves out, and the database driver pin."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ignored(patterns: list[str], path: str) -> bool:
    # Docker matches each pattern against the path from the context root (Go filepath.Match);
    # fnmatch is a close enough reading for these plain patterns.
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or fnmatch.fnmatch(path, p)
               or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_docker_build_leaves_local_studies_out() -> None:
    text = (ROOT / "docker" / "Dockerfile.dockerignore").read_text()
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for path in ("studies/demo.db", "studies/demo.db.lock", "studies/demo.db-wal",
                 "studies/demo-artifacts/x.onnx", ".git/HEAD", "venv/bin/python"):
        assert _ignored(patterns, path), path
    for path in ("studies/demo.yaml", "autocompress/cli.py", "pyproject.toml", "README.md"):
        assert not _ignored(patterns, path), path


def test_sqlalchemy_pinned_where_bare_postgresql_means_psycopg3() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"sqlalchemy>=([\d.]+)"', text)
    assert pin is not None
    assert tuple(int(x) for x in pin.group(1).split(".")) >= (2, 1)
    assert '"psycopg[binary]>=3"' in text
