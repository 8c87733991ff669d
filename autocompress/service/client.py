"""The HTTP client behind ``submit``, ``jobs``, ``watch``, ``cancel`` and ``fetch``: one
request per call, the server's one-line JSON error raised as ServiceError, a server that does
not answer as one line naming it, server-sent events parsed, and an export unzipped without
letting any member escape its folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import requests

from autocompress.errors import InputError

ENV_SERVER = "AUTOCOMPRESS_SERVER"
ENV_TOKEN = "AUTOCOMPRESS_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"
_TIMEOUT_S = 30.0
# What `admin token create` prints: "ac_" and URL-safe characters.
_TOKEN_RE = re.compile(r"ac_[A-Za-z0-9_-]{1,200}")


class ServiceError(InputError):
    """The server refused a request (its one-line error) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def server_url(given: str | None = None) -> str:
    url = (given or os.environ.get(ENV_SERVER) or DEFAULT_SERVER).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--server {url!r} is not an http(s) URL; e.g. --server "
                         "http://127.0.0.1:8080")
    return url


def token_from_env() -> str:
    token = os.environ.get(ENV_TOKEN, "").strip()
    if not token:
        raise InputError(f"no project token: set {ENV_TOKEN} to the token an admin created "
                         "with `autocompress admin token create PROJECT`")
    return check_token(token)


def check_token(token: str) -> str:
    """The token, or a one-line InputError when it is not one (a pasted label, a cut-off
    copy, a character an HTTP header cannot carry)."""
    if not _TOKEN_RE.fullmatch(token):
        raise InputError(f"{ENV_TOKEN} is not a project token (it starts with 'ac_' followed "
                         "by letters, digits, '-' and '_'); copy the whole token `autocompress "
                         "admin token create PROJECT` printed")
    return token


class ServiceClient:
    """The service's API for one project (its token) on one server."""

    def __init__(self, server: str, token: str, *, timeout: float = _TIMEOUT_S) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {check_token(token)}"

    # -- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, f"{self.server}{path}", **kwargs)
        except requests.ConnectionError:
            raise ServiceError(f"cannot reach the autocompress service at {self.server}; is "
                               "`autocompress serve` running there (--server URL or "
                               f"{ENV_SERVER})?") from None
        except requests.Timeout:
            raise ServiceError(f"the service at {self.server} did not answer within "
                               f"{self.timeout:g} s; try again") from None
        except requests.RequestException as exc:  # a bad URL, TLS, a broken answer
            raise self._failed(exc) from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    def _failed(self, exc: BaseException) -> ServiceError:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        return ServiceError(f"the request to the autocompress service at {self.server} failed "
                            f"({type(exc).__name__}{': ' + detail if detail else ''}); check "
                            f"--server (or {ENV_SERVER}) and try again")

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
        except (ValueError, requests.RequestException):  # not JSON, or cut off mid-body
            body = None
        if not isinstance(body, dict):
            raise ServiceError(f"the service at {self.server} answered {path} with no JSON "
                               "object; is --server an autocompress service?")
        return body

    # -- the API --------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], files: dict[str, Path] | None = None
               ) -> dict[str, Any]:
        """Queue a job; ``files``: field (weights, data, model_file) -> local file."""
        if not files:
            return self._json("POST", "/api/v1/jobs", json=spec)["job"]
        with _opened(files) as handles:
            return self._json("POST", "/api/v1/jobs", data={"spec": json.dumps(spec)},
                              files=handles, timeout=max(self.timeout, 600.0))["job"]

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/v1/jobs")["jobs"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{job_id}")["job"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/jobs/{job_id}/cancel")["job"]

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) of the job's server-sent events until the stream ends."""
        response = self._request("GET", f"/api/v1/jobs/{job_id}/events", stream=True,
                                 timeout=(10.0, 60.0))  # the server beats every 15 s
        try:
            with response:
                for event, data in parse_events(response.iter_lines(decode_unicode=True)):
                    if event == "error":
                        raise ServiceError(str(data.get("error") or "the event stream failed"))
                    yield event, data
        except requests.RequestException as exc:
            raise ServiceError(f"lost the event stream of job {job_id} from {self.server} "
                               f"({type(exc).__name__})") from None

    def request_export(self, job_id: str, trial: int | None = None) -> dict[str, Any]:
        body = {"best": True} if trial is None else {"trial": trial}
        return self._json("POST", f"/api/v1/jobs/{job_id}/export", json=body)["export"]

    def wait_export(self, job_id: str, *, poll_s: float = 1.0,
                    timeout_s: float = 3600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job(job_id)["export"]
            if state["state"] == "done":
                return state
            if state["state"] != "running":
                reason = state.get("reason") or f"export state {state['state']}"
                raise ServiceError(f"the export of job {job_id} failed: {reason}")
            if time.monotonic() > deadline:
                raise ServiceError(f"the export of job {job_id} is still running after "
                                   f"{timeout_s:g} s; run fetch again later")
            time.sleep(poll_s)

    def download_export(self, job_id: str, dest: Path) -> None:
        response = self._request("GET", f"/api/v1/jobs/{job_id}/export", stream=True,
                                 timeout=(10.0, 300.0))
        try:
            with response, dest.open("wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
        except requests.RequestException as exc:  # the download cut off or timed out
            raise self._failed(exc) from None


def _error_of(response: requests.Response) -> ServiceError:
    try:
        body = response.json()
        message = str(body["error"])
        field = body.get("field")
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code} {response.reason} from {response.url}"
        field = None
    return ServiceError(message, status=response.status_code, field=field)


class _opened:
    """The upload files opened for the request, closed after it."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.handles: dict[str, tuple[str, IO[bytes]]] = {}

    def __enter__(self) -> dict[str, tuple[str, IO[bytes]]]:
        for field, path in self.files.items():
            self.handles[field] = (path.name, path.open("rb"))
        return self.handles

    def __exit__(self, *exc: Any) -> None:
        for _, handle in self.handles.values():
            handle.close()


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Server-sent events (``event:``/``data:`` lines, blank line ends one; comments
    skipped) as (event, JSON data)."""
    event, data = "message", []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                try:
                    yield event, json.loads("\n".join(data))
                except ValueError:
                    pass
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def safe_unzip(archive: Path, out: Path) -> list[str]:
    """Extract into ``out`` (new or empty) every regular member whose path stays inside it;
    any absolute, ``..`` or link member refuses the whole archive. All or nothing."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {str(out)!r} exists and is not an empty folder; pass a new "
                         "or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    names: list[str] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = _member_path(info)
                if name is None:
                    continue
                target = tmp.joinpath(*PurePosixPath(name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                names.append(name)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _member_path(info: zipfile.ZipInfo) -> str | None:
    """The member's safe relative path; None for a folder entry; refuses anything else."""
    name = info.filename
    if info.is_dir():
        return None
    mode = (info.external_attr >> 16) & 0o170000
    path = PurePosixPath(name)
    if (not path.parts or mode not in (0, 0o100000) or name.startswith(("/", "\\"))
            or "\\" in name or ".." in path.parts or ":" in path.parts[0]):
        raise ServiceError(f"the export archive holds an unsafe member {name!r}; nothing "
                           "was extracted")
    return path.as_posix()


__all__ = ["DEFAULT_SERVER", "ENV_SERVER", "ENV_TOKEN", "ServiceClient", "ServiceError",
           "check_token", "parse_events", "safe_unzip", "server_url", "token_from_env"]
