"""The Flask application: read-only pages and JSON endpoints over one study database.

Safety model (the dashboard may be bound to a shared machine's network interface):
- only GET/HEAD are served; every other method gets 405 before any route runs;
- with a token configured, every request (pages, JSON, static files) must carry it;
- artifacts are resolved from the trial's recorded ``artifact_id``; the request never
  names a file or an id, so nothing outside the study's artifacts can be served.
"""

from __future__ import annotations

import hmac
import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from flask import (
    Flask,
    Response,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
)
from werkzeug.exceptions import HTTPException

from autocompress.dashboard._analysis import compact_ranges
from autocompress.dashboard._db import Missing
from autocompress.dashboard._storage import StudyReader

TOKEN_ENV = "AUTOCOMPRESS_DASHBOARD_TOKEN"
TOKEN_COOKIE = "autocompress_token"
TOKEN_HEADER = "X-Autocompress-Token"
_ALLOWED_METHODS = ("GET", "HEAD")
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


def plotly_js_path() -> Path:
    """plotly.min.js from the installed plotly package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plotly package is not installed; pip install plotly")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise FileNotFoundError("plotly/package_data/plotly.min.js not found; reinstall plotly")


def create_app(
    storage_url: str,
    *,
    artifacts_dir: str | Path | None = None,
    token: str | None = None,
) -> Flask:
    """Build the dashboard app. Raises StudyError when the storage cannot be opened.

    ``token`` (or env AUTOCOMPRESS_DASHBOARD_TOKEN) turns authentication on: requests must
    carry it as ``?token=`` (once; it is then kept in a cookie), ``Authorization: Bearer`` or
    the ``X-Autocompress-Token`` header.
    """
    reader = StudyReader(storage_url, artifacts_dir)
    token = token or os.environ.get(TOKEN_ENV) or None
    plotly_js = plotly_js_path()
    here = Path(__file__).parent
    app = Flask(
        "autocompress.dashboard",
        template_folder=str(here / "templates"),
        static_folder=str(here / "static"),
    )
    app.config["READER"] = reader
    app.config["TOKEN"] = token
    app.json.sort_keys = False  # keep metric order as built

    _install_guards(app, token)
    _install_pages(app, reader)
    _install_api(app, reader, plotly_js)
    _install_errors(app)
    return app


# -- request guards ----------------------------------------------------------------------


def _install_guards(app: Flask, token: str | None) -> None:
    @app.before_request
    def _guard() -> Any:
        if request.method not in _ALLOWED_METHODS:
            return _method_not_allowed()
        if token is None:
            return None
        query = request.args.get("token")
        if any(_matches(value, token) for value in _supplied_tokens()):
            if _matches(query, token):
                g.set_token_cookie = True
            if query is not None and _wants_html():
                # Keep the token out of the address bar, history and Referer headers.
                args = {k: v for k, v in request.args.items() if k != "token"}
                target = request.path + ("?" + urlencode(args) if args else "")
                # the cookie is set once, by _headers below (it runs for this response too)
                return redirect(target, code=303)
            return None
        message = (
            "this dashboard needs its access token: open the URL printed by "
            "`autocompress dashboard` (it ends in ?token=...), or send the header "
            f"'Authorization: Bearer TOKEN' or '{TOKEN_HEADER}: TOKEN'"
        )
        if _wants_html():
            return render_template(
                "error.html", title="Token required", status=401, message=message, links=[]
            ), 401
        return jsonify({"error": message}), 401

    @app.after_request
    def _headers(response: Response) -> Response:
        if token is not None and g.get("set_token_cookie"):
            _set_cookie(response, token)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _supplied_tokens() -> list[str]:
    """Every place a token may come from; any one that matches lets the request through."""
    values = [
        request.headers.get(TOKEN_HEADER),
        request.args.get("token"),
        request.cookies.get(TOKEN_COOKIE),
    ]
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        values.append(auth[7:].strip())
    return [v for v in values if v]


def _matches(value: str | None, token: str) -> bool:
    return bool(value) and hmac.compare_digest(value.encode(), token.encode())


def _set_cookie(response: Response, token: str) -> None:
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")


def _wants_html() -> bool:
    return not (
        request.path.startswith("/api/")
        or request.path.startswith("/static/")
        or request.path.startswith("/vendor/")
    )


def _method_not_allowed() -> Response:
    response = jsonify({"error": f"{request.method} is not allowed: the dashboard is read-only"})
    response.status_code = 405
    response.headers["Allow"] = ", ".join(_ALLOWED_METHODS)
    return response


# -- pages -------------------------------------------------------------------------------


def _install_pages(app: Flask, reader: StudyReader) -> None:
    @app.get("/")
    def studies_page() -> Any:
        return render_template("studies.html", title="Studies", data=_studies_payload(reader))

    @app.get("/study/<name>")
    def study_page(name: str) -> Any:
        data = reader.study(name)
        return render_template("study.html", title=f"Study {name}", study=data)

    @app.get("/study/<name>/trial/<number>")
    def trial_page(name: str, number: str) -> Any:
        data = reader.trial(name, _trial_number(reader, name, number))
        return render_template("trial.html", title=f"{name} · trial {data['number']}", trial=data)


def _trial_number(reader: StudyReader, name: str, text: str) -> int:
    """Parse the URL's trial number; anything else is a 404 listing the real numbers."""
    try:
        return int(text)
    except ValueError:
        data = reader.study(name)
        numbers = [t["number"] for t in data["trials"]]
        raise Missing(
            f"trial {text!r} is not a trial number of study {name!r}; "
            f"trials: {compact_ranges(numbers)}",
            [str(n) for n in numbers],
        ) from None


# -- JSON API ----------------------------------------------------------------------------


def _install_api(app: Flask, reader: StudyReader, plotly_js: Path) -> None:
    @app.get("/api/studies")
    def api_studies() -> Any:
        return _unless_unchanged(_studies_payload(reader))

    @app.get("/api/study/<name>")
    def api_study(name: str) -> Any:
        return _unless_unchanged(reader.study(name))

    @app.get("/api/trial/<name>/<number>")
    def api_trial(name: str, number: str) -> Any:
        return _unless_unchanged(reader.trial(name, _trial_number(reader, name, number)))

    @app.get("/api/report/<name>/<number>")
    def api_report(name: str, number: str) -> Any:
        n = _trial_number(reader, name, number)
        response = jsonify(reader.report(name, n))
        response.headers["Content-Disposition"] = (
            f'attachment; filename="{_safe_filename(name)}-trial{n}-report.json"'
        )
        return response

    @app.get("/api/artifact/<name>/<number>")
    def api_artifact(name: str, number: str) -> Any:
        n = _trial_number(reader, name, number)
        handle, info = reader.open_artifact(name, n)
        response = send_file(
            handle,
            mimetype=info["mimetype"],
            as_attachment=True,
            download_name=_safe_filename(info["filename"]),
        )
        if info.get("sha256"):
            response.headers["X-Artifact-SHA256"] = str(info["sha256"])
        return response

    @app.get("/vendor/plotly.min.js")
    def plotly_bundle() -> Any:
        response = send_file(plotly_js, mimetype="text/javascript", max_age=86400)
        return response


def _studies_payload(reader: StudyReader) -> dict[str, Any]:
    studies = reader.studies()
    signature = "|".join(f"{s['name']}:{s['signature']}" for s in studies)
    return {"storage": reader.display_url, "studies": studies, "signature": signature}


def _unless_unchanged(data: dict[str, Any]) -> Response:
    """Pages poll with ?since=<signature>; an unchanged study answers in a few bytes."""
    if request.args.get("since") == data["signature"]:
        return jsonify({"signature": data["signature"], "unchanged": True})
    return jsonify(data)


def _safe_filename(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")
    return cleaned or "download"


# -- errors ------------------------------------------------------------------------------


def _install_errors(app: Flask) -> None:
    @app.errorhandler(Missing)
    def _missing(exc: Missing) -> Any:
        if not _wants_html():
            return jsonify({"error": exc.message, "existing": exc.existing}), 404
        links = _existing_links(exc)
        return render_template(
            "error.html", title="Not found", status=404, message=exc.message, links=links
        ), 404

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        if exc.code == 405:
            return _method_not_allowed()
        if not _wants_html():
            return jsonify({"error": exc.description}), exc.code
        message = exc.description or exc.name
        if exc.code == 404:
            message = f"no page at {request.path}; start from the list of studies"
        return render_template(
            "error.html", title=exc.name, status=exc.code, message=message, links=[("Studies", "/")]
        ), exc.code


def _existing_links(exc: Missing) -> list[tuple[str, str]]:
    """Links to what does exist: studies for an unknown study, trials for an unknown trial."""
    parts = [p for p in request.path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "study":  # /study/<name>/trial/<n>
        base = f"/study/{quote(parts[1], safe='')}/trial/"
        return [(f"trial {n}", base + n) for n in exc.existing]
    return [(n, f"/study/{quote(n, safe='')}") for n in exc.existing]
