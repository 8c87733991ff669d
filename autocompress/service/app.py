"""The service's Flask application: project-token authentication, security headers and JSON
errors around the ``/api/v1`` routes (``app_api``) and the project's pages (``app_pages``).

Safety model (the service is meant to be reachable by several teams):
- every request except the OpenAPI document, static files and the login page carries a
  project token (``Authorization: Bearer``, ``X-Autocompress-Token``, or ``?token=`` once,
  then an HttpOnly SameSite=Strict cookie); the token names the one project it may see;
- another project's job is answered exactly like an unknown id (404, same body), on every
  route and page, because every lookup goes through ``store.job(project, id)``;
- a POST authenticated by the cookie alone must come from this origin (no cross-site form
  can submit or cancel a job with a user's cookie);
- every 4xx/5xx under ``/api/`` is one line of JSON ``{"error", "field"}``; a real bug is
  logged with its traceback and answered ``internal error: <one line>``, never a trace.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request
from werkzeug.exceptions import HTTPException

from autocompress.errors import AutocompressError, InputError, StudyError, one_line
from autocompress.service.app_api import install_api
from autocompress.service.app_pages import install_pages
from autocompress.service.app_state import ServiceState, build_state

TOKEN_COOKIE = "autocompress_service_token"
TOKEN_HEADER = "X-Autocompress-Token"
_LOG = logging.getLogger("autocompress.service")
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
# Reachable without a token: the API's description, the pages' CSS/JS, the login page.
_PUBLIC = ("/api/v1/openapi.json", "/static/", "/login")


def create_service_app(
    storage_url: str,
    *,
    artifacts: str | Path,
    allow_code_upload: bool = False,
    upload_limits: Any = None,
    work_dir: str | Path | None = None,
) -> Flask:
    """The service's app over one database (queue, projects and job studies) and one
    artifact location (a folder or ``s3://bucket/prefix``). ``work_dir`` holds exports
    (default: a fresh temporary folder). Raises StudyError when the database cannot be
    opened."""
    state = build_state(storage_url, artifacts=artifacts, allow_code_upload=allow_code_upload,
                        upload_limits=upload_limits, work_dir=work_dir)
    here = Path(__file__).parent
    app = Flask("autocompress.service", template_folder=str(here / "templates"),
                static_folder=str(here / "static"))
    app.config["SERVICE"] = state
    app.config["MAX_CONTENT_LENGTH"] = state.max_request_bytes
    app.json.sort_keys = False
    _install_guards(app, state)
    install_api(app, state)
    install_pages(app, state)
    _install_errors(app)
    return app


# -- authentication ----------------------------------------------------------------------


def _install_guards(app: Flask, state: ServiceState) -> None:
    @app.before_request
    def _guard() -> Any:
        if request.path == "/api/v1" or any(request.path.startswith(p) for p in _PUBLIC):
            return None
        found = _authenticate(state)
        if found is None:
            return _unauthorized()
        project, source = found
        g.project = project
        if source == "cookie" and request.method not in ("GET", "HEAD", "OPTIONS"):
            if not _same_origin():
                return _json_error("a request carrying only the session cookie must come from "
                                   "this server's own pages; send the token as 'Authorization: "
                                   "Bearer TOKEN' instead", 403)
        if source == "query" and _wants_html():
            # Keep the token out of the address bar, history and Referer headers.
            g.set_token_cookie = request.args["token"]
            args = {k: v for k, v in request.args.items() if k != "token"}
            return redirect(request.path + ("?" + urlencode(args) if args else ""), code=303)
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        secret = g.get("set_token_cookie")
        if secret:
            response.set_cookie(TOKEN_COOKIE, secret, httponly=True, samesite="Strict",
                                path="/")
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _authenticate(state: ServiceState) -> tuple[str, str] | None:
    """(project, where the token came from) for the first supplied token that is known."""
    auth = request.headers.get("Authorization", "")
    candidates = [
        ("header", auth[7:].strip() if auth.lower().startswith("bearer ") else ""),
        ("header", request.headers.get(TOKEN_HEADER, "")),
        ("query", request.args.get("token", "")),
        ("cookie", request.cookies.get(TOKEN_COOKIE, "")),
    ]
    for source, secret in candidates:
        if secret and len(secret) <= 200:
            project = state.project_for_token(secret)
            if project is not None:
                g.token = secret  # an event stream checks it again while it lasts
                return project, source
    return None


def _same_origin() -> bool:
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return False
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == request.host_url.rstrip("/")


def _unauthorized() -> Any:
    message = ("this service needs a project token: send 'Authorization: Bearer TOKEN' (an "
               "admin creates one with `autocompress admin token create PROJECT`)")
    if _wants_html():
        return render_template("login.html", title="Token required", next=request.path), 401
    return _json_error(message, 401)


def _wants_html() -> bool:
    return not (request.path.startswith("/api/") or request.path.startswith("/static/"))


def _json_error(message: str, status: int, field: str | None = None) -> Response:
    response = jsonify({"error": message, "field": field})
    response.status_code = status
    return response


# -- errors ------------------------------------------------------------------------------


def _install_errors(app: Flask) -> None:
    @app.errorhandler(InputError)
    def _input(exc: InputError) -> Any:
        field = getattr(exc, "field", None)
        # A StudyError here is the database gone past its retries: the request was fine.
        default = 503 if isinstance(exc, StudyError) else 400
        status = int(getattr(exc, "status", default))
        return _error(one_line(exc, whole=True, limit=500), status, field)

    @app.errorhandler(AutocompressError)
    def _ours(exc: AutocompressError) -> Any:
        return _error(one_line(exc, whole=True, limit=500), 409, getattr(exc, "field", None))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        status = exc.code or 500
        message = _http_message(exc, status)
        response = _error(message, status, None)
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            response.headers["Allow"] = ", ".join(sorted(valid))
        return response

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Any:
        _LOG.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
        return _error(f"internal error: {one_line(exc, typed=True)}", 500, None)


def _http_message(exc: HTTPException, status: int) -> str:
    if status == 404:
        return f"no route {request.path}; GET /api/v1/openapi.json lists the API's routes"
    if status == 405:
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or ()))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed or 'none'}"
    if status == 413:
        return ("the request body is larger than this server accepts; upload smaller files "
                "(the operator sets the limit)")
    return one_line(Exception(exc.description or exc.name), limit=300)


def _error(message: str, status: int, field: str | None) -> Any:
    if _wants_html():
        body = render_template("error.html", title=f"Error {status}", status=status,
                               message=message)
        return Response(body, status=status, mimetype="text/html")
    return _json_error(message, status, field)


__all__ = ["TOKEN_COOKIE", "TOKEN_HEADER", "create_service_app"]
