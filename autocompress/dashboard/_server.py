"""Start the dashboard: host/token rules and port checks before anything is served."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler
from werkzeug.serving import make_server as _werkzeug_server

from autocompress.dashboard._app import TOKEN_ENV, create_app
from autocompress.errors import StudyError
from autocompress.study.urls import masked_url


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&])token=)[^&\s]*", re.IGNORECASE)


def mask_token(text: str) -> str:
    """A request line with the value of any ``token=`` query parameter replaced by ***."""
    return _TOKEN_IN_QUERY.sub(r"\1***", text)


class _MaskingRequestHandler(WSGIRequestHandler):
    """werkzeug's handler, whose access log never shows the dashboard's token."""

    def log(self, type: str, message: str, *args: Any) -> None:
        super().log(type, mask_token(message % args) if args else mask_token(message))


def _check_port_free(host: str, port: int) -> None:
    """Bind a probe socket first so a busy port is a one-line error, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Same option werkzeug sets: a TIME_WAIT leftover is not "in use", a listener is.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host.strip("[]"), port))
    except OSError as exc:
        raise StudyError(
            f"port {port} on {host} is already in use ({exc.strerror}); pick another with "
            "--port, or stop the program that holds it"
        ) from None
    finally:
        probe.close()


def make_server(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    artifacts_dir: str | Path | None = None,
) -> BaseWSGIServer:
    """A threaded werkzeug server, bound but not yet serving (call ``serve_forever``).

    Raises StudyError when the storage cannot be opened, the port is busy, or a
    non-loopback host is asked for without a token.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise StudyError(
            f"binding the dashboard to {host} exposes it to the network; pass --token SECRET "
            f"(or set {TOKEN_ENV}), or keep the default host 127.0.0.1"
        )
    if not 0 <= int(port) <= 65535:
        raise StudyError(f"port {port} is not a TCP port; use a number from 1 to 65535")
    app = create_app(storage_url, artifacts_dir=artifacts_dir, token=token)
    _check_port_free(host, port)
    try:
        return _werkzeug_server(host, port, app, threaded=True,
                                request_handler=_MaskingRequestHandler)
    except OSError as exc:  # lost a race for the port, or the address is not ours
        raise StudyError(
            f"cannot serve on {host}:{port} ({exc.strerror or exc}); pick another --port or --host"
        ) from None


def serve(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    artifacts_dir: str | Path | None = None,
) -> None:
    """Serve until interrupted. Every setup problem is a StudyError raised before serving."""
    server = make_server(
        storage_url, host=host, port=port, token=token, artifacts_dir=artifacts_dir
    )
    token = token or os.environ.get(TOKEN_ENV) or None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"
    # The token is the user's own (--token or the environment): never echoed into a log.
    hint = f" (open {url}?token=<your token> once; a cookie keeps it)" if token else ""
    print(f"autocompress dashboard: {url}{hint}", flush=True)
    print(f"read-only view of {masked_url(storage_url)}; press Ctrl+C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
