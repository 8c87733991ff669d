"""Command line: parse -> call the library -> print -> exit code. No logic of its own.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 130 interrupted.
Logging and progress go to stderr, tables to stdout; ``--json`` prints machine output.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from autocompress import __version__
from autocompress.config.flags import add_config_flags, attach_negative_values, int_list
from autocompress.config.options import DEFAULT_STUDIES_DIR, config_keys, default_storage_url
from autocompress.errors import AutocompressError, InputError, StudyError, one_line
from autocompress.logs import quiet_libraries


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    add_config_flags(p.add_argument_group("model and data (none: the built-in demo CNN on "
                                          "digits)"), "model")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocompress",
        description="Compress a trained PyTorch model: search per-layer pruning, int8/int4 "
        "quantization and distillation under a latency or size budget, measured on the "
        "exported ONNX file.",
    )
    parser.add_argument("--version", action="version", version=f"autocompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_search, _add_readers, _add_profile, _add_dashboard, _add_export,
                _add_refine_and_sensitivity):
        add(sub)
    _add_service_commands(sub)
    return parser


def _add_service_commands(sub: Any) -> None:
    """The service's commands (serve, worker, admin, and the client's submit/jobs/watch/
    cancel/fetch): each module adds its parsers with ``set_defaults(handler=...)``."""
    from autocompress.service import cli_admin, cli_client, cli_worker

    for module in (cli_client, cli_worker, cli_admin):
        module.add_parsers(sub)


def _add_search(sub: Any) -> None:
    s = sub.add_parser("search", help="run the compression search (the main job)")
    s.add_argument("--config", help="YAML study config (studies/demo.yaml); flags override it")
    _add_model_options(s)
    add_config_flags(s, "task")
    add_config_flags(s, "storage")
    add_config_flags(s, "search")
    s.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_readers(sub: Any) -> None:
    sh = sub.add_parser("show", help="the Pareto table of a study, from the database")
    add_config_flags(sh, "storage")
    sh.add_argument("--all", action="store_true", help="every trial, not just the front")
    sh.add_argument("--json", action="store_true")

    ls = sub.add_parser("list", help="studies in the storage, with trial counts")
    ls.add_argument("--storage", help=f"database URL (default: every {DEFAULT_STUDIES_DIR}/*.db)")
    ls.add_argument("--json", action="store_true")


def _add_profile(sub: Any) -> None:
    pr = sub.add_parser("profile", help="per-layer params, FLOPs and latency share")
    _add_model_options(pr)
    pr.add_argument("--input-shape", type=int_list,
                    help="C,H,W of one input (default: from the data or the model spec)")
    pr.add_argument("--repeats", type=int, default=20, help="timed forward passes")
    pr.add_argument("--onnx", help="profile this ONNX file in ONNX Runtime (an exported "
                    "model.onnx: what deploys) instead of a PyTorch model")
    pr.add_argument("--threads", type=int, default=1, help="runtime threads (--onnx)")
    pr.add_argument("--target", default="onnxruntime-cpu", help="with --onnx: the runtime "
                    "whose profiler times the file: onnxruntime-cpu, openvino-cpu, "
                    "onnxruntime-cuda or tensorrt (GPU)")
    pr.add_argument("--format", choices=("table", "json", "csv"), default="table")


def _add_dashboard(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="browse the Pareto front in a browser")
    add_config_flags(d, "storage")
    d.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--token", help="required for a non-loopback --host "
                   "(or AUTOCOMPRESS_DASHBOARD_TOKEN)")


def _add_export(sub: Any) -> None:
    e = sub.add_parser("export", help="write the chosen candidate, verified, with a report")
    add_config_flags(e, "storage")
    pick = e.add_mutually_exclusive_group(required=True)
    pick.add_argument("--best", action="store_true", help="best feasible within budgets")
    pick.add_argument("--trial", type=int, help="a trial number")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--budget", action="append", dest="budgets", metavar="LIMIT",
                   help="tighten the study's budgets (repeatable)")
    e.add_argument("--max-accuracy-drop", help="e.g. 1%% or 0.01, relative to fp32")
    e.add_argument("--force", action="store_true", help="write into a non-empty folder")
    e.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip re-measuring the written file")
    e.add_argument("--refine-epochs", type=int, metavar="E", help="first fine-tune the chosen "
                   "plan for E epochs (a new trial, see `refine`), then export that")
    e.add_argument("--json", action="store_true")


def _add_refine_and_sensitivity(sub: Any) -> None:
    rf = sub.add_parser("refine", help="fine-tune one trial's plan for whole epochs (a new "
                        "trial, measured on its own file)")
    add_config_flags(rf, "storage")
    rf.add_argument("--trial", type=int, required=True, help="the trial whose plan to refine")
    rf.add_argument("--epochs", type=int, required=True, help="epochs over the training split")
    rf.add_argument("--learning-rate", type=float, metavar="LR", help="peak learning rate of "
                    "the refine (default: the study's, chosen for its short fine-tunes)")
    rf.add_argument("--out", help="also export the refined trial, verified, to this folder")
    rf.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    rf.add_argument("--json", action="store_true")

    se = sub.add_parser("sensitivity", help="per-layer sensitivity table of a study "
                        "(which layers must stay at high precision)")
    add_config_flags(se, "storage")
    se.add_argument("--top", type=int, help="only the N most sensitive layers and groups")
    se.add_argument("--json", action="store_true")


def _study_and_storage(args: argparse.Namespace) -> tuple[str, str]:
    """The study a reading command names, and its storage URL (default: its SQLite file)."""
    from autocompress.study.urls import require_url  # an empty --storage never means default

    name = args.study or "demo"
    return name, default_storage_url(name) if args.storage is None else require_url(args.storage)


# -- commands ----------------------------------------------------------------------------


def _search(args: argparse.Namespace) -> int:
    from autocompress.config.files import build_config
    from autocompress.results import tables as report
    from autocompress.search.loop import run_search

    # Every SearchConfig field that has a flag of the same name (the YAML keys are the
    # fields too), so a new field cannot be forgotten here.
    keys = [k for k in config_keys() if hasattr(args, k)]
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if overrides["budgets"] is not None:
        overrides["budgets"] = tuple(overrides["budgets"])
    config = build_config(args.config, overrides)
    with report.SearchProgress(config.trials, enabled=not args.json) as progress:
        result = run_search(config, on_progress=progress.update, on_start=progress.note)
    if args.json:
        print(json.dumps(report.result_json(result), indent=2))
    else:
        report.print_front(result.records, result.front, result.budgets,
                           title=f"Pareto front of study {result.study!r}", metric=result.metric)
        report.print_next_steps(result.study, result.storage_url, result.artifacts_dir)
    if result.stop_reason:  # after the table, so the last line says why the run ended early
        print(result.stop_reason, file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from autocompress.api import load_study
    from autocompress.intake.metric import label_of
    from autocompress.results import tables as report
    from autocompress.results.pareto import fp32_record

    name, url = _study_and_storage(args)
    handle = load_study(name, storage=url)
    recs = handle.records()
    shown = recs if args.all else handle.pareto_front()
    if args.json:
        fp32 = fp32_record(recs)  # the comparisons need it even when not shown
        print(json.dumps([report.record_json(r, fp32) for r in shown], indent=2))
    else:
        what = "Trials" if args.all else "Pareto front"
        report.print_front(recs, shown, handle.budgets(), title=f"{what} of study {name!r}",
                           metric=label_of(handle.info.attrs.get("metric")))
    return 0


def _list(args: argparse.Namespace) -> int:
    from autocompress.results import tables as report
    from autocompress.study import study_summaries

    found = sorted(Path(DEFAULT_STUDIES_DIR).glob("*.db"))  # each study's default file
    urls = [default_storage_url(p.stem) for p in found] if args.storage is None else [args.storage]
    rows = [dict(row, storage=url) for url in urls for row in study_summaries(url)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report.print_studies(rows)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from autocompress import intake
    from autocompress.runtime import torch_profile as profile

    if args.onnx:
        return _profile_onnx(args)
    model, example = intake.load_for_profile(
        args.model, args.weights, args.data,
        num_classes=args.num_classes, input_size=args.input_size,
        input_shape=args.input_shape,
    )
    result = profile.profile_model(model, example, repeats=args.repeats)
    if args.format == "json":
        print(result.to_json())
    elif args.format == "csv":
        print(result.to_csv(), end="")
    else:
        print(profile.format_table(result))
    return 0


def _profile_onnx(args: argparse.Namespace) -> int:
    from autocompress.runtime import onnx_profile

    if args.model or args.weights or args.data:
        raise InputError("--onnx profiles a file on its own; drop --model/--weights/--data")
    shape = list(args.input_shape) if args.input_shape else None
    result = onnx_profile.profile_onnx(args.onnx, shape, repeats=args.repeats,
                                       threads=args.threads, target=args.target)
    render = {"json": result.to_json, "csv": result.to_csv}.get(args.format)
    print(render() if render else onnx_profile.format_table(result), end="")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from autocompress.dashboard import serve

    _, url = _study_and_storage(args)
    serve(url, host=args.host, port=args.port, token=args.token,
          artifacts_dir=args.artifacts)
    return 0


def _export(args: argparse.Namespace) -> int:
    from autocompress import export
    from autocompress.results import tables as report
    from autocompress.search import refine

    name, url = _study_and_storage(args)
    common: dict[str, Any] = {
        "out": args.out, "trial": args.trial, "best": args.best,
        "budgets": tuple(args.budgets or ()), "max_accuracy_drop": args.max_accuracy_drop,
        "force": args.force, "verify": args.verify, "artifacts_dir": args.artifacts,
    }
    if args.refine_epochs is not None:
        with report.StepProgress("refine", enabled=not args.json) as bar:
            result = refine.refine_and_export(url, name, epochs=args.refine_epochs,
                                              on_step=bar.update, on_note=bar.note, **common)
    else:
        result = export.export_from_storage(url, name, **common)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    return 0


def _refine(args: argparse.Namespace) -> int:
    from autocompress.results import tables as report
    from autocompress.search import refine

    name, url = _study_and_storage(args)
    if args.out:  # check the folder before a fine-tune of many minutes
        from autocompress.export import check_out
        check_out(Path(args.out).expanduser().absolute(), args.force)
    with report.StepProgress("refine", enabled=not args.json) as bar:
        record = refine.refine_trial(url, name, args.trial, args.epochs,
                                     artifacts_dir=args.artifacts, on_step=bar.update,
                                     on_note=bar.note, learning_rate=args.learning_rate)
    exported = None
    if args.out:
        from autocompress.export import export_from_storage
        exported = export_from_storage(url, name, out=args.out, trial=record.number,
                                       force=args.force, artifacts_dir=args.artifacts)
    if args.json:
        data = refine.refine_json(record)
        if exported is not None:
            data["export"] = exported.to_dict()
        print(json.dumps(data, indent=2))
        return 0
    report.print_front([record], [record], [], title=f"Refined trial {record.number} (plan of "
                       f"trial {args.trial}, {args.epochs} epoch(s))")
    if exported is not None:
        print(exported.summary())
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from autocompress.results import tables as report
    from autocompress.search.sensitivity import SENSITIVITY_ATTR, Sensitivity
    from autocompress.study import load_existing_study

    name, url = _study_and_storage(args)
    study = load_existing_study(url, name)
    stored = study.user_attrs.get(SENSITIVITY_ATTR)
    if stored is None:
        raise StudyError(
            f"study {name!r} has no sensitivity table yet; run `autocompress search --study "
            f"{name}` (its sensitivity pass runs unless --no-guided)")
    table = Sensitivity.from_dict(json.loads(stored))
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    else:
        report.print_sensitivity(table, top=args.top)
    return 0


_COMMANDS = {
    "search": _search,
    "show": _show,
    "list": _list,
    "profile": _profile,
    "dashboard": _dashboard,
    "export": _export,
    "refine": _refine,
    "sensitivity": _sensitivity,
}


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(attach_negative_values(
            list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as exc:  # --help, --version, or a one-line usage error (code 2)
        return int(exc.code or 0)
    quiet_libraries(verbose=args.verbose)
    if args.command is None:
        parser.print_help()
        return 0
    # SIGTERM ends a worker like Ctrl-C: Optuna fails the running trial, the database stays
    # consistent, and the process exits 130.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        handler = getattr(args, "handler", None) or _COMMANDS[args.command]
        return int(handler(args))
    except AutocompressError as exc:
        print(f"error: {one_line(exc, whole=True, limit=None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial was marked failed; finished trials are kept "
              "(run the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # not met by a check above: still one line, the rest with -v
        if args.verbose:
            raise
        print(f"error: {one_line(exc, typed=True)} (unexpected: run again with -v for the "
              "traceback, and please report it)", file=sys.stderr)
        return 2




if __name__ == "__main__":
    sys.exit(main())
