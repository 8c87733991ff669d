"""A submitted job checked field by field into its stored spec (plain JSON), and a stored
spec turned into the ``SearchConfig`` a worker runs. Every search option is accepted with the
CLI's checks; where a job lives (study, storage, artifacts) is the service's, and nothing in a
request names a path on the server."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from autocompress.config.files import config_from_stored
from autocompress.config.flags import base_type, float_list, int_list
from autocompress.config.options import SearchConfig
from autocompress.errors import BudgetError, InputError

UPLOAD_FIELDS = ("weights", "data", "model_file")
# Request keys the service owns, with why they are refused.
_REFUSED = {
    "study": "the service names a job's study (job-<id>)",
    "storage": "the service keeps every job in its own database",
    "artifacts": "the service keeps artifacts in its own store",
    "config": "send the options themselves as JSON keys",
    "task": "a task factory is code on the server; send model and data instead",
}
# SearchConfig fields a request may set besides the search group (all harmless values).
_EXTRA_OPTIONS = ("num_classes", "input_size", "mean", "std")
_SPEC_KEYS = ("model", "weights", "data", "factory", "data_options", "budget")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL_RES = (re.compile(r"demo"), re.compile(r"torchvision:[A-Za-z0-9_]+"),
              re.compile(r"timm:[A-Za-z0-9][A-Za-z0-9_.-]*"),
              re.compile(rf"hf:{_NAME}/{_NAME}"))
_FACTORY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DATA_OPTION_KEYS = ("text", "label", "max_length")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
TEXT_SUFFIXES = (".csv", ".jsonl")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


_HINTS = typing.get_type_hints(SearchConfig)
# The service's ceilings: values the CLI accepts on one's own machine but that would hold a
# shared worker for days or exhaust its memory (a job that kills its worker is re-run).
MAXIMA: dict[str, float] = {
    "trials": 10_000, "finetune_steps": 100_000, "latency_repeats": 10_000,
    "input_size": 4096, "batch_size": 4096, "latency_batch_size": 4096,
    "train_threads": 256, "threads": 256, "num_classes": 100_000,
    "time_limit": 10_080,  # minutes: one week
}


class JobSpecError(InputError):
    """A refused submission; ``field`` names the request field (None: the whole request)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _search_options() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(SearchConfig)
            if f.metadata.get("group") == "search" or f.name in _EXTRA_OPTIONS}


def check_submission(body: Mapping[str, Any], files: Mapping[str, Any], *, allow_code: bool,
                     dataset_exists: Callable[[str], bool]) -> dict[str, Any]:
    """The stored spec of a request: ``body`` its JSON, ``files`` its uploads by field
    (``(filename, size)`` pairs or objects with ``.filename``). Raises JobSpecError naming
    the field and how to fix it."""
    if not isinstance(body, Mapping):
        raise JobSpecError("the job must be a JSON object of options, e.g. "
                           '{"model": "demo", "data": "digits", "trials": 5}')
    names = {field: upload_name(field, value) for field, value in files.items()}
    options = _search_options()
    for key in body:
        _check_key(str(key), options)
    spec: dict[str, Any] = {"model": _check_model(body, names, allow_code)}
    if "model_file" in names:
        spec["factory"] = _check_factory(body.get("factory"))
    elif "factory" in body:
        raise JobSpecError("factory names the function of an uploaded model_file; upload the "
                           ".py file in field model_file, or drop factory", "factory")
    spec.update(_check_data(body, names, dataset_exists))
    if "weights" in body:
        raise JobSpecError("weights are accepted only as an uploaded file: send a multipart "
                           "request with the state_dict in the file field 'weights'", "weights")
    if "weights" in names and spec["model"] == "demo" and "model_file" not in names \
            and "model" not in body:
        raise JobSpecError("uploaded weights need the model they belong to: set model (e.g. "
                           "torchvision:resnet18)", "model")
    _check_finite(body)
    overrides = _check_options(body, options)
    _check_maxima(overrides)
    spec.update(_plain(overrides))
    spec.setdefault("trials", SearchConfig.trials)
    if names:
        spec["uploads"] = dict(sorted(names.items()))
    return spec


def _check_key(key: str, options: Mapping[str, Any]) -> None:
    if key in _REFUSED:
        raise JobSpecError(f"{key} cannot be set in a job: {_REFUSED[key]}; remove it", key)
    if key not in options and key not in _SPEC_KEYS:
        known = sorted([*options, "model", "data", "factory", "data_options"])
        raise JobSpecError(f"unknown option {key!r}; known options: {', '.join(known)}", key)


def upload_name(field: str, value: Any) -> str:
    """The uploaded file's name: its last path part, which must be a plain file name."""
    if field not in UPLOAD_FIELDS:
        raise JobSpecError(f"unknown file field {field!r}; upload files as "
                           f"{', '.join(UPLOAD_FIELDS)}", field)
    raw = value[0] if isinstance(value, tuple) else getattr(value, "filename", value)
    name = re.split(r"[\\/]", str(raw or ""))[-1].strip()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_. +-]{0,150}", name) or ".." in name:
        raise JobSpecError(f"uploaded file name {name!r} in {field} is not a plain file name; "
                           "rename it (letters, digits, '_', '-', '.')", field)
    return name


def _check_model(body: Mapping[str, Any], names: Mapping[str, str], allow_code: bool) -> str:
    if "model_file" in names:
        if not allow_code:
            raise JobSpecError("this server does not accept model code: send a model spec "
                               "(torchvision:NAME, timm:NAME, hf:ORG/NAME) instead of "
                               "model_file (the operator allows it with serve "
                               "--allow-code-upload)", "model_file")
        if not names["model_file"].endswith(".py"):
            raise JobSpecError("model_file must be a Python file (.py) defining the factory",
                               "model_file")
        if body.get("model") not in (None, "file"):
            raise JobSpecError("send either a model spec or a model_file upload, not both; "
                               "drop model", "model")
        return "file"
    model = body.get("model", "demo")
    model = "demo" if model is None else model
    if not isinstance(model, str) or ".." in model or not any(
            r.fullmatch(model) for r in _MODEL_RES):
        raise JobSpecError(f"model {model!r} is not accepted; use demo, torchvision:NAME, "
                           "timm:NAME or hf:ORG/NAME (a server path never is)", "model")
    return model


def _check_factory(value: Any) -> str:
    factory = "build_model" if value is None else value
    if not isinstance(factory, str) or not _FACTORY_RE.fullmatch(factory):
        raise JobSpecError(f"factory {factory!r} must be a Python function name in the "
                           "uploaded model_file (default build_model)", "factory")
    return factory


def _check_data(body: Mapping[str, Any], names: Mapping[str, str],
                dataset_exists: Callable[[str], bool]) -> dict[str, Any]:
    data = body.get("data")
    options = body.get("data_options")
    if "data" in names:
        if data not in (None, "upload"):
            raise JobSpecError("send either data or an uploaded data file, not both; drop "
                               "data", "data")
        name = names["data"].lower()
        if not name.endswith(ARCHIVE_SUFFIXES + TEXT_SUFFIXES):
            raise JobSpecError(f"uploaded data {names['data']!r} must be an ImageFolder "
                               "archive (.zip, .tar.gz, .tgz, .tar: train/<class>/<image> and "
                               "val/ or test/) or a text file (.csv, .jsonl)", "data")
        out: dict[str, Any] = {"data": "upload"}
        if options is not None:
            if not name.endswith(TEXT_SUFFIXES):
                raise JobSpecError("data_options apply to an uploaded .csv/.jsonl only; drop "
                                   "it", "data_options")
            out["data_options"] = _check_data_options(options)
        return out
    if options is not None:
        raise JobSpecError("data_options apply to an uploaded .csv/.jsonl only; drop it",
                           "data_options")
    data = "digits" if data is None else data
    if data == "digits":
        return {"data": "digits"}
    if isinstance(data, str) and data.startswith("dataset:"):
        if dataset_exists(data[len("dataset:"):]):
            return {"data": data}
        raise JobSpecError(f"{data} is not registered for this project; ask the operator to "
                           "register it (autocompress admin dataset add NAME SPEC) or upload "
                           "the data", "data")
    raise JobSpecError(f"data {data!r} is not accepted; use digits, dataset:NAME (registered "
                       "by the operator), or upload a .zip/.tar.gz ImageFolder or a .csv in "
                       "the file field data (a server path never is)", "data")


def _check_data_options(options: Any) -> str:
    """``text=COL&label=COL&max_length=N`` for an uploaded text file (no tokenizer path)."""
    if not isinstance(options, str):
        raise JobSpecError("data_options must be a string such as text=review&label=stars",
                           "data_options")
    for part in filter(None, options.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in _DATA_OPTION_KEYS or not re.fullmatch(r"[\w .-]{1,64}", value):
            raise JobSpecError(f"data option {part!r} is not accepted; use "
                               f"{', '.join(k + '=' for k in _DATA_OPTION_KEYS)} with a column "
                               "name or a number (e.g. text=review&label=stars)",
                               "data_options")
    return options


def _check_options(body: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The search options of ``body``, coerced and checked as a YAML config is (the CLI's
    checks); the error names the option its message is about."""
    given = {str(k): _listed(v, options[str(k)]) for k, v in body.items()
             if str(k) in options and v is not None}
    if body.get("budget") is not None:
        if "budgets" in given:
            raise JobSpecError("send budgets or budget, not both", "budget")
        value = body["budget"]
        given["budgets"] = value if isinstance(value, list) else [value]
    try:
        config = config_from_stored(given)
    except InputError as exc:  # ConfigError, BudgetError
        field = "budgets" if isinstance(exc, BudgetError) else _named_field(str(exc), given)
        if field == "budgets" and "budget" in body:
            field = "budget"
        raise JobSpecError(str(exc).replace("config key", "option"), field) from None
    return {key: getattr(config, key) for key in given}


def _check_finite(body: Mapping[str, Any]) -> None:
    """JSON as Python reads it admits NaN and Infinity: no option of a job may be one."""
    for key, value in body.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise JobSpecError(f"{key} must be a finite number, not {value!r}", str(key))


def _check_maxima(values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        top = MAXIMA.get(key)
        if top is not None and isinstance(value, int | float) and value > top:
            raise JobSpecError(f"{key} {value:g} is over this service's limit of {top:g}; "
                               f"send {key} <= {top:g}", key)


def _listed(value: Any, field: dataclasses.Field[Any]) -> Any:
    """A number list sent as the CLI writes it ("8,4") as a list of numbers; a value that is
    not one is left for the check to name."""
    hint = _HINTS[field.name]
    if not isinstance(value, str) or typing.get_origin(base_type(hint)) is not tuple:
        return value
    parse = {int: int_list, float: float_list}.get(typing.get_args(base_type(hint))[0])
    try:
        return list(parse(value)) if parse else value
    except argparse.ArgumentTypeError:
        return value


def _named_field(message: str, given: Mapping[str, Any]) -> str | None:
    """The option a check's message names first (``kd_temperature_min must be ...``)."""
    hits = [(message.find(k), -len(k), k) for k in given if k in message]
    return min(hits)[2] if hits else None


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def upload_paths(spec: Mapping[str, Any], files_dir: Path) -> dict[str, Path]:
    """Where each upload of ``spec`` lies once materialised under ``files_dir``: weights and
    model files as themselves, a text file in ``data/``, an archive extracted into ``data/``."""
    paths: dict[str, Path] = {}
    for field, name in dict(spec.get("uploads") or {}).items():
        if field == "data" and not str(name).lower().endswith(TEXT_SUFFIXES):
            paths[field] = files_dir / "data"
        else:
            paths[field] = files_dir / field / str(name)
    return paths


def data_root(folder: Path) -> Path:
    """An extracted archive's ImageFolder root: the folder, or its one subfolder when the
    archive wrapped everything in one (flowers.zip -> flowers/train/...)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] \
        if folder.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "train").is_dir():
        return entries[0]
    return folder


def to_config(spec: Mapping[str, Any], *, study: str, storage: str, artifacts: str | None,
              files_dir: Path, dataset_spec: Callable[[str], str | None]) -> SearchConfig:
    """The SearchConfig a worker runs for a stored spec whose uploads are materialised in
    ``files_dir``; a dataset no longer registered is a DataSpecError-like InputError."""
    paths = upload_paths(spec, files_dir)
    values: dict[str, Any] = {k: v for k, v in spec.items()
                              if k not in ("model", "data", "factory", "data_options",
                                           "uploads")}
    model = str(spec.get("model") or "demo")
    if model == "file":
        model = f"{paths['model_file']}:{spec.get('factory') or 'build_model'}"
    values["model"] = None if model == "demo" and "weights" not in paths else model
    if "weights" in paths:
        values["weights"] = str(paths["weights"])
    values["data"] = _data_spec(spec, paths, dataset_spec)
    return config_from_stored(values, study=study, storage=storage, artifacts=artifacts)


def _data_spec(spec: Mapping[str, Any], paths: Mapping[str, Path],
               dataset_spec: Callable[[str], str | None]) -> str:
    data = str(spec.get("data") or "digits")
    if data == "upload":
        path = paths["data"]
        if path.parent.name == "data" and path.name.lower().endswith(TEXT_SUFFIXES):
            options = spec.get("data_options")
            return f"text:{path}" + (f"?{options}" if options else "")
        return f"imagefolder:{data_root(path)}"
    if data.startswith("dataset:"):
        name = data[len("dataset:"):]
        registered = dataset_spec(name)
        if registered is None:
            raise InputError(f"dataset {name!r} is no longer registered for this project; "
                             "register it again (autocompress admin dataset add) and "
                             "resubmit")
        return registered
    return data


__all__ = ["UPLOAD_FIELDS", "JobSpecError", "check_submission", "data_root", "to_config",
           "upload_name", "upload_paths"]
