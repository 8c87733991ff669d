"""Read-only web dashboard for autocompress studies: Pareto front, trials, plans, artifacts.

Reads the Optuna storage the search wrote (never writes to it) and never imports torch, so
it starts in a second on any machine that can reach the database.

    from autocompress.dashboard import serve
    serve("sqlite:///studies/demo.db")            # http://127.0.0.1:8080/

Layer 5. May import: ``errors``, ``config``, ``study``, ``results`` (nothing that loads torch).
"""

from __future__ import annotations

from autocompress.dashboard._app import TOKEN_ENV, create_app
from autocompress.dashboard._server import is_loopback, make_server, serve

__all__ = ["TOKEN_ENV", "create_app", "is_loopback", "make_server", "serve"]
