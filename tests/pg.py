"""PostgreSQL for tests.

``fresh_database()`` creates ``ac_<random>`` on the server named by ``AUTOCOMPRESS_TEST_PG_URL``
(e.g. ``postgresql://autocompress:autocompress@127.0.0.1:5432/postgres``, a role allowed to
CREATE DATABASE) and drops it afterwards. ``PrivateServer`` is a throwaway PostgreSQL of our
own (initdb in a temporary folder, a free port) for tests that stop the server: stopping the
shared one would break every other test that is using it at that moment.

Without the URL the tests skip; with ``AUTOCOMPRESS_REQUIRE_SERVICES=1`` (CI) they fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.engine import make_url

ENV_URL = "AUTOCOMPRESS_TEST_PG_URL"
ENV_VERSION = "AUTOCOMPRESS_TEST_PG_VERSION"


def required() -> bool:
    return os.environ.get("AUTOCOMPRESS_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> NoReturn:
    if required():
        pytest.fail(f"{reason} (services are required: AUTOCOMPRESS_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def server_url() -> str:
    """The test server's URL, or skip (fail under CI) when none is configured."""
    url = os.environ.get(ENV_URL)
    if not url:
        unavailable(f"set {ENV_URL}=postgresql://user:pw@host:5432/postgres for PostgreSQL tests")
    return url


def _driver_url(url: str) -> str:
    """psycopg takes ``postgresql://``; SQLAlchemy URLs may name a driver (``+psycopg``)."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _admin(url: str):  # -> psycopg.Connection
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(_driver_url(url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {make_url(url).render_as_string()} is not reachable: "
                    f"{str(exc).strip().splitlines()[0]}")


@contextlib.contextmanager
def fresh_database(url: str | None = None) -> Iterator[str]:
    """A new empty database; yields its URL (dropped at the end, even if clients linger)."""
    url = url or server_url()
    name = f"ac_{secrets.token_hex(6)}"
    admin = _admin(url)
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateServer:
    """A PostgreSQL server of this test alone, which the test may stop and start.

    Runs as the ``postgres`` system user when the tests run as root (PostgreSQL refuses root),
    with trust authentication on 127.0.0.1 only.
    """

    def __init__(self) -> None:
        version = os.environ.get(ENV_VERSION) or _newest_version()
        self.bin = Path(f"/usr/lib/postgresql/{version}/bin")
        if not (self.bin / "initdb").is_file():
            unavailable(f"PostgreSQL server binaries not found in {self.bin}; "
                        "apt-get install postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="ac-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)

    def init(self) -> PrivateServer:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        try:
            if self.running():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _newest_version() -> str:
    versions = sorted(
        (p.name for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()), key=int
    ) if Path("/usr/lib/postgresql").is_dir() else []
    return versions[-1] if versions else "15"


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer]:
    """A started private server, stopped and removed at the end whatever happens."""
    server = PrivateServer()
    try:
        server.init().start()
        yield server
    finally:
        server.close()


def wait_until(condition, timeout: float, what: str, every: float = 0.5) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
