"""``autocompress admin``: the operator's commands on the service database: projects,
tokens (a secret shown once, only its hash stored), and datasets registered by name."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from autocompress.service.store import DEFAULT_SERVICE_DB, ENV_SERVICE_DB

_STORAGE_HELP = (f"the service database (default: ${ENV_SERVICE_DB}, else {DEFAULT_SERVICE_DB}; "
                 "postgresql://user:pw@host/db for several machines)")


def add_parsers(sub: Any) -> None:
    """Add ``admin`` (project, token, dataset) to the top-level parser ``sub``."""
    admin = sub.add_parser("admin", help="manage the service: projects, their tokens, "
                           "registered datasets",
                           description="Operator commands on the service database.")
    kinds = admin.add_subparsers(dest="admin_kind", metavar="WHAT", required=True)
    _add_project(kinds)
    _add_token(kinds)
    _add_dataset(kinds)


def _command(parent: Any, name: str, help: str, handler: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    parser.add_argument("--storage", help=_STORAGE_HELP)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler=handler)
    return parser


def _add_project(kinds: Any) -> None:
    project = kinds.add_parser("project", help="create or list projects")
    acts = project.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    create = _command(acts, "create", "create a project (a team whose jobs only its tokens "
                      "see)", _project_create)
    create.add_argument("name", help="1-40 lowercase letters, digits and '-'")
    _command(acts, "list", "list the projects", _project_list)


def _add_token(kinds: Any) -> None:
    token = kinds.add_parser("token", help="create, revoke or list project tokens")
    acts = token.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    create = _command(acts, "create", "create a token for a project; its secret is printed "
                      "once (only its hash is stored)", _token_create)
    create.add_argument("project")
    create.add_argument("--label", default="", help="what the token is for (e.g. ci, alice)")
    revoke = _command(acts, "revoke", "revoke a token by id (its requests are refused from "
                      "now on)", _token_revoke)
    revoke.add_argument("id", help="the token's id (admin token list)")
    listing = _command(acts, "list", "list tokens: ids, labels, created, revoked (never "
                       "secrets)", _token_list)
    listing.add_argument("project", nargs="?", help="only this project's")


def _add_dataset(kinds: Any) -> None:
    dataset = kinds.add_parser("dataset", help="register or list datasets jobs may name")
    acts = dataset.add_subparsers(dest="admin_action", metavar="ACTION", required=True)
    add = _command(acts, "add", "register a dataset: jobs name it as dataset:NAME (the spec, "
                   "a path on the workers, is never shown to them)", _dataset_add)
    add.add_argument("name")
    add.add_argument("spec", help="a data spec as for --data, e.g. imagefolder:/data/flowers")
    add.add_argument("--project", help="only this project may use it (default: every project)")
    _command(acts, "list", "list the registered datasets", _dataset_list)


def _store(args: argparse.Namespace) -> Any:
    from autocompress.service.store import JobStore

    return JobStore(args.storage)


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool,
                empty: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(empty, file=sys.stderr)
        return
    shown = [[_when(r[c]) if c.endswith("_at") else str(r[c] if r[c] is not None else "-")
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in shown)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in shown:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _project_create(args: argparse.Namespace) -> int:
    _store(args).create_project(args.name)
    if args.json:
        print(json.dumps({"project": args.name}))
    else:
        print(f"project {args.name} created; give it a token: "
              f"autocompress admin token create {args.name}")
    return 0


def _project_list(args: argparse.Namespace) -> int:
    _print_rows(_store(args).projects(), ["name", "created_at"], args.json,
                "no projects yet: autocompress admin project create NAME")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    token_id, secret = _store(args).create_token(args.project, args.label)
    if args.json:
        print(json.dumps({"id": token_id, "project": args.project, "token": secret}))
        return 0
    print(f"token {token_id} for project {args.project} (shown once; only its hash is kept):")
    print(secret)
    print("use it with: export AUTOCOMPRESS_TOKEN=<the token above>", file=sys.stderr)
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    _store(args).revoke_token(args.id)
    print(json.dumps({"revoked": args.id}) if args.json else f"token {args.id} revoked")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    _print_rows(_store(args).tokens(args.project),
                ["id", "project", "label", "created_at", "revoked_at"], args.json,
                "no tokens: autocompress admin token create PROJECT")
    return 0


def _dataset_add(args: argparse.Namespace) -> int:
    new = _store(args).register_dataset(args.name, args.spec, args.project)
    scope = f"project {args.project}" if args.project else "every project"
    if args.json:
        print(json.dumps({"dataset": args.name, "project": args.project, "new": new}))
    else:
        print(f"dataset:{args.name} {'registered' if new else 're-pointed'} for {scope}")
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    rows = _store(args).datasets()
    if not args.json:
        rows = [{**r, "project": r["project"] or "(every project)"} for r in rows]
    _print_rows(rows, ["name", "project", "data_spec"], args.json,
                "no datasets registered: autocompress admin dataset add NAME SPEC")
    return 0
