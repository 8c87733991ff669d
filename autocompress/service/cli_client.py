"""``autocompress serve`` and the client's commands (``submit``, ``jobs``, ``watch``,
``cancel``, ``fetch``): their parsers and handlers. The HTTP side is ``service.client``."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autocompress.config.flags import add_config_flags, config_flags
from autocompress.errors import InputError

_ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar")
_TEXTS = (".csv", ".jsonl")
_FACTORY_FILE = re.compile(r"^(?P<path>.+\.py)(?::(?P<factory>[A-Za-z_][A-Za-z0-9_]*))?$")


def add_parsers(sub: Any) -> None:
    """Add serve, submit, jobs, watch, cancel and fetch to the top-level parser ``sub``."""
    _add_serve(sub)
    s = sub.add_parser("submit", help="submit a compression job to a service (the same "
                       "flags as search; local files are uploaded)")
    _server_flag(s)
    add_config_flags(s.add_argument_group("model and data (local --weights, --data and "
                                          "--model file.py:factory are uploaded)"), "model")
    for flag, kwargs in config_flags("task"):
        if flag != "--task":  # a task factory is code on the server: the service refuses it
            s.add_argument(flag, **kwargs)
    add_config_flags(s, "search")
    s.add_argument("--json", action="store_true", help="print the job as JSON")
    s.set_defaults(handler=_submit)

    j = sub.add_parser("jobs", help="the jobs of your project on a service")
    _server_flag(j)
    j.add_argument("--json", action="store_true")
    j.set_defaults(handler=_jobs)

    w = sub.add_parser("watch", help="follow a job live: each trial as it lands, then its end "
                       "(exit 0 done, 1 failed or cancelled)")
    _server_flag(w)
    w.add_argument("job", help="the job id (from submit or jobs)")
    w.add_argument("--json", action="store_true", help="print each event as a JSON line")
    w.set_defaults(handler=_watch)

    c = sub.add_parser("cancel", help="cancel a job (it stops after its current trial; "
                       "finished trials are kept)")
    _server_flag(c)
    c.add_argument("job")
    c.set_defaults(handler=_cancel)

    f = sub.add_parser("fetch", help="export a job's best (or one) trial on the server, "
                       "verified, and download it")
    _server_flag(f)
    f.add_argument("job")
    f.add_argument("--out", required=True, help="a new or empty folder for the files")
    f.add_argument("--trial", type=int, help="this trial instead of the best within budgets")
    f.add_argument("--json", action="store_true")
    f.set_defaults(handler=_fetch)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the compression service (API, pages and, on SQLite, "
                       "one embedded worker)")
    p.add_argument("--storage", help="the service database (default: $AUTOCOMPRESS_SERVICE_DB,"
                   " else sqlite:///studies/service.db; postgresql://... for several workers)")
    p.add_argument("--artifacts", help="artifacts and uploads: a folder or s3://bucket/prefix "
                   "(default: $AUTOCOMPRESS_SERVICE_ARTIFACTS, else beside a SQLite database)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; "
                   "every request needs a project token either way)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allow-code-upload", action="store_true", help="accept a model .py file "
                   "in jobs (runs that code on the workers: only for trusted projects)")
    p.add_argument("--embedded-workers", type=int, metavar="N", help="worker threads in this "
                   "process (default 1 on SQLite, 0 on PostgreSQL)")
    p.set_defaults(handler=_serve)


def _server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="the service's URL (default: $AUTOCOMPRESS_SERVER, else "
                   "http://127.0.0.1:8080); the token comes from $AUTOCOMPRESS_TOKEN")


def _client(args: argparse.Namespace) -> Any:
    from autocompress.service.client import ServiceClient, server_url, token_from_env

    return ServiceClient(server_url(args.server), token_from_env())


# -- serve --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from autocompress.service.cli_worker import storage_and_artifacts
    from autocompress.service.server import serve_service

    url, artifacts = storage_and_artifacts(args.storage, args.artifacts)
    serve_service(url, host=args.host, port=args.port, artifacts=artifacts,
                  allow_code_upload=args.allow_code_upload,
                  embedded_workers=args.embedded_workers)
    return 0


# -- submit -------------------------------------------------------------------------------


def submission(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Path]]:
    """(the job's JSON, local files to upload) from the search flags given."""
    from autocompress.config.options import config_keys

    body: dict[str, Any] = {}
    for key in config_keys():
        value = getattr(args, key, None)
        if value is not None and key not in ("study", "storage", "artifacts", "config"):
            body[key] = list(value) if isinstance(value, tuple | list) else value
    files: dict[str, Path] = {}
    weights = body.pop("weights", None)
    if weights is not None:
        files["weights"] = _local_file(weights, "--weights")
    model = body.get("model")
    match = _FACTORY_FILE.match(model) if isinstance(model, str) else None
    if match and Path(match["path"]).expanduser().is_file():
        files["model_file"] = Path(match["path"]).expanduser()
        body.pop("model")
        body["factory"] = match["factory"] or "build_model"
    if isinstance(body.get("data"), str):
        _data_upload(body, files)
    return body, files


def _local_file(text: str, flag: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise InputError(f"{flag} {text!r} is not a file here; pass the local file to upload")
    return path


def _data_upload(body: dict[str, Any], files: dict[str, Path]) -> None:
    """A local --data (a folder, an archive, a .csv, or imagefolder:/text: of one) becomes
    an upload; digits and dataset:NAME stay names the server resolves."""
    data = str(body["data"])
    if data == "digits" or data.startswith("dataset:"):
        return
    spec, _, options = data.partition("?")
    for prefix in ("imagefolder:", "text:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    path = Path(spec).expanduser()
    if path.is_dir():
        files["data"] = path  # zipped when sent
    elif path.is_file() and path.name.lower().endswith(_ARCHIVES + _TEXTS):
        files["data"] = path
    else:
        return  # not local: the server says what it accepts
    body.pop("data")
    if options:
        body["data_options"] = options


@contextmanager
def _zipped_folders(files: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """The files to send, a data folder zipped into a temporary archive first."""
    with tempfile.TemporaryDirectory(prefix="autocompress-upload-") as tmp:
        out = dict(files)
        for field, path in files.items():
            if path.is_dir():
                archive = Path(tmp) / f"{path.name or 'data'}.zip"
                _zip_folder(path, archive)
                out[field] = archive
        yield out


def _zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for item in sorted(folder.rglob("*")):
            if item.is_file() and not item.is_symlink():
                zf.write(item, item.relative_to(folder).as_posix())


def _submit(args: argparse.Namespace) -> int:
    client = _client(args)
    body, files = submission(args)
    with _zipped_folders(files) as sending:
        job = client.submit(body, sending)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(job["id"])
        print(f"queued job {job['id']} ({job.get('trials_target')} trials); follow it with "
              f"`autocompress watch {job['id']}`", file=sys.stderr)
    return 0


# -- jobs, watch, cancel --------------------------------------------------------------------


def _jobs(args: argparse.Namespace) -> int:
    jobs = _client(args).jobs()
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no jobs yet; submit one with `autocompress submit`")
        return 0
    print(f"{'JOB':<13} {'STATE':<10} {'TRIALS':>9} {'SECONDS':>8}  MODEL / DATA")
    for job in jobs:
        p = job["progress"]
        trials = f"{p['trials_done']}/{p['trials_target']}"
        line = (f"{job['id']:<13} {job['state']:<10} {trials:>9} {p['seconds_used']:>8.0f}  "
                f"{job.get('model')} / {job.get('data')}")
        print(line + (f"  ({job['error']})" if job.get("error") else ""))
    return 0


def trial_line(t: dict[str, Any]) -> str:
    parts = [f"trial {t['number']}", t["state"].lower()]
    if t.get("baseline"):
        parts.append(f"baseline {t['baseline']}")
    if t.get("accuracy") is not None:
        parts.append(f"accuracy {t['accuracy']:.4f}")
    if t.get("size_bytes") is not None:
        parts.append(f"size {t['size_bytes'] / 1000:.1f} kB")
    if t.get("latency_ms") is not None:
        parts.append(f"latency {t['latency_ms']:.3f} ms")
    if t.get("on_front"):
        parts.append("on the front")
    if t.get("reason"):
        parts.append(str(t["reason"]))
    return ", ".join(parts)


def _watch(args: argparse.Namespace) -> int:
    from autocompress.service.client import ServiceError

    client = _client(args)
    seen: set[int] = set()
    for attempt in range(6):
        try:
            for event, data in client.events(args.job):
                if args.json:
                    print(json.dumps({"event": event, "data": data}), flush=True)
                elif event == "trial" and data["number"] not in seen:
                    print(trial_line(data), flush=True)
                elif event == "state":
                    print(f"job {data['id']}: {data['state']} ({data['trials_done']}/"
                          f"{data['trials_target']} trials)", file=sys.stderr, flush=True)
                if event == "trial":
                    seen.add(data["number"])
                if event == "end":
                    return _end(data, args.json)
        except ServiceError as exc:
            if exc.status is not None or attempt == 5:
                raise
        except OSError:  # the stream broke (server restarting): follow it again
            if attempt == 5:
                raise
        time.sleep(min(2.0 * (attempt + 1), 10.0))
    raise InputError(f"lost the event stream of job {args.job}; run watch again")


def _end(data: dict[str, Any], as_json: bool) -> int:
    if not as_json:
        why = f": {data['error']}" if data.get("error") else ""
        print(f"job {data['id']} {data['state']}{why} ({data['trials_done']} trial(s))",
              flush=True)
    return 0 if data["state"] == "done" else 1


def _cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job)
    if job["state"] == "cancelled":
        print(f"job {job['id']} cancelled")
    elif job["state"] in ("done", "failed"):
        print(f"job {job['id']} had already ended ({job['state']})")
    else:
        print(f"job {job['id']}: cancel requested; it stops after its current trial "
              "(finished trials are kept)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from autocompress.service.client import safe_unzip

    out = Path(args.out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {args.out!r} exists and is not an empty folder; pass a new "
                         "or empty folder")
    client = _client(args)
    client.request_export(args.job, args.trial)
    client.wait_export(args.job)
    with tempfile.TemporaryDirectory(prefix="autocompress-fetch-") as tmp:
        archive = Path(tmp) / "export.zip"
        client.download_export(args.job, archive)
        names = safe_unzip(archive, out)
    report = _report(out)
    if args.json:
        print(json.dumps({"job": args.job, "out": str(out), "files": names,
                          "report": report}, indent=2))
        return 0
    trial = report.get("trial", {}).get("number") if isinstance(report.get("trial"),
                                                                dict) else report.get("trial")
    print(f"job {args.job}: exported trial {trial} to {out} ({', '.join(sorted(names))})")
    return 0


def _report(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
