"""YAML study configs: read a file and check each value against its field's type, so a typo
or a wrong type is a ``ConfigError`` naming the key, never a silent default."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml

from autocompress.errors import ConfigError


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; lists become tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__}")
        return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    return _scalar(key, value, hint)


def _scalar(key: str, value: Any, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


def read_config_file(path: str | Path, hints: dict[str, Any]) -> dict[str, Any]:
    """A YAML study config as checked keyword arguments (``hints``: field name -> type)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see studies/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of keys to values")
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "budget":  # singular spelling, as on the command line
            name = "budgets"
            value = value if isinstance(value, list) else [value]
        if name not in hints:
            raise ConfigError(
                f"unknown config key {key!r} in {path}; known keys: {', '.join(sorted(hints))}"
            )
        checked[name] = coerce(name, value, hints[name])
    return checked
