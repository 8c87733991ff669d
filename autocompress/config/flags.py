"""Command-line flags generated from ``SearchConfig``'s fields: the one list of settings.

Each field carries its help text and the commands that share it (``group``); the flag is the
field name with dashes, a ``--no-`` flag for a setting that is on by default, and the type
follows the field's (comma lists for tuples). So a new setting gets its flag, its YAML key
and (a test checks) its row in docs/cli.md from one place (``config.reference``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from autocompress.config.options import SearchConfig


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None


_LIST_TYPES: dict[Any, Callable[[str], Any]] = {int: int_list, float: float_list, str: csv_list}


def base_type(hint: Any) -> Any:
    """``int | None`` -> int: the type a flag parses into."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def flag_of(field: dataclasses.Field[Any]) -> str:
    if field.metadata.get("flag"):
        return str(field.metadata["flag"])
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def config_flags(group: str) -> list[tuple[str, dict[str, Any]]]:
    """(flag, argparse keyword arguments) of every field in ``group``, in field order."""
    hints = typing.get_type_hints(SearchConfig)
    flags = []
    for field in dataclasses.fields(SearchConfig):
        if field.metadata.get("group") != group:
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"]}
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        base = base_type(hints[field.name])
        if base is bool:  # on by default: the flag turns it off (None: not given)
            kwargs.update(action="store_const", const=not field.default)
        elif field.metadata.get("flag"):  # a repeatable singular flag (--budget)
            kwargs["action"] = "append"
        elif typing.get_origin(base) is tuple:
            kwargs["type"] = _LIST_TYPES[typing.get_args(base)[0]]
        else:
            kwargs["type"] = base
        flags.append((flag_of(field), kwargs))
    return flags


def add_config_flags(parser: Any, group: str) -> None:
    """Add the flags of ``group`` (model, task, storage, search) to an argparse parser."""
    for flag, kwargs in config_flags(group):
        parser.add_argument(flag, **kwargs)


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--budget -5ms`` as ``--budget=-5ms``: argparse reads a value that starts with '-'
    as an option ("expected one argument"); attached, the value reaches the check that says
    what is wrong with it (a budget must be positive)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if (token.startswith("--") and "=" not in token and token != "--"
                and re.match(r"-\.?\d", following)):
            out.append(f"{token}={following}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


__all__ = [
    "add_config_flags",
    "attach_negative_values",
    "config_flags",
    "csv_list",
    "flag_of",
    "float_list",
    "int_list",
]
