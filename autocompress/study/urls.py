"""Storage URLs: the one parser of SQLite URLs, the PostgreSQL driver a URL names, and the
URL as shown in messages (password hidden)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import quote

import sqlalchemy

from autocompress.errors import StudyError


def require_url(url: str) -> str:
    """``url`` itself; an empty one is refused (it must never quietly mean the default)."""
    if not url.strip():
        raise StudyError("storage is empty; pass a database URL (e.g. sqlite:///studies/demo.db)"
                         " or leave --storage out for the study's default file")
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:`` URL, None for server databases. Parsed the way the
    driver opens it (SQLAlchemy's URL: a ``?query`` is not part of the file, ``%20`` is a
    space); a SQLite URL naming no file (in memory, a ``file:`` URI) is a StudyError."""
    if not url.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise StudyError(
            f"storage {masked_url(url)!r} is not a SQLite file; pass "
            "sqlite:///path/to/study.db"
        )
    return Path(database)


def read_only_sqlite_url(path: Path) -> str:
    """A URL that opens the SQLite file at ``path`` read-only (``mode=ro``): a reader can
    never write to it, not even Optuna's tables into an empty file."""
    return f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"


# The PostgreSQL drivers SQLAlchemy can use, in the order we prefer them. A bare
# ``postgresql://`` means psycopg2 in SQLAlchemy 2.0 and psycopg 3 in 2.1; the ``postgres``
# extra installs psycopg 3, so the URL names the driver that is installed, whichever
# SQLAlchemy is.
_PG_DRIVERS: tuple[tuple[str, str], ...] = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))


def driver_url(url: str) -> str:
    """``url`` with an explicit, installed PostgreSQL driver (other URLs unchanged).

    ``postgresql://`` / ``postgres://`` become ``postgresql+psycopg://`` (or ``+psycopg2``
    when only that is installed); a URL naming its driver is left as written. Raises a
    one-line StudyError when no driver is installed.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, dialect in _PG_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://{rest}"
    raise StudyError(
        "no PostgreSQL driver is installed for storage "
        f"{masked_url(url)!r}; install it with: pip install 'autocompress[postgres]'"
    )


def masked_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing to hide reliably
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
