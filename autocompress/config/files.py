"""Building a ``SearchConfig``: defaults < YAML file (``--config``) < command line, and
from the config a study recorded. Each YAML value is checked against its field's type, so a
typo or a wrong type is a ``ConfigError`` naming the key, never a silent default."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from autocompress.config.options import SearchConfig
from autocompress.errors import ConfigError, one_line


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SearchConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SearchConfig)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against the field's type; lists become tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
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


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML study config into checked keyword arguments for SearchConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see studies/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read as text ({one_line(exc)}); "
                          "pass a YAML study config such as studies/demo.yaml") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of keys to values")
    hints = _field_types()
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
        checked[name] = _coerce(name, value, hints[name])
    return checked


def build_config(config_file: str | Path | None, overrides: dict[str, Any]) -> SearchConfig:
    """Defaults < file < overrides (overrides whose value is None are not given). A file's
    value a flag overrides must still be valid: a broken file is refused, never half used.
    A device the machine lacks (cuda without CUDA) is refused too."""
    from_file: dict[str, Any] = load_config_file(config_file) if config_file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    config = _config({**from_file, **given})
    if set(from_file) & set(given):
        try:  # the file's values over the flags: flags' own errors were reported above
            _config({**given, **from_file})
        except ConfigError as exc:
            raise ConfigError(f"config file {str(config_file)!r}: {exc}") from None
    _check_device(config.device)
    return config


def _config(values: dict[str, Any]) -> SearchConfig:
    try:
        return SearchConfig(**values)
    except TypeError as exc:  # a key that slipped past the checks above
        raise ConfigError(f"bad config: {exc}") from None


def _check_device(device: str) -> None:
    """--device cuda on a machine without CUDA: refused here, where the user chose it (a
    library search falls back to the CPU with a warning)."""
    if not device.startswith("cuda"):
        return
    import torch  # only when CUDA was asked for: the config layer stays light

    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available on this "
                          "machine; use --device cpu, or auto (CUDA when there is one)")


def config_from_stored(values: dict[str, Any], **overrides: Any) -> SearchConfig:
    """The SearchConfig a study recorded (its ``config`` attribute), with ``overrides``.
    Keys this version does not know (a study written by another one) are left out."""
    hints = _field_types()
    checked = {k: _coerce(k, v, hints[k]) for k, v in values.items() if k in hints}
    if checked.get("model") is None and checked.get("task") is None:
        checked.pop("weights", None)  # an older study's unused weights (the demo was built)
    checked.update(overrides)
    try:
        return SearchConfig(**checked)
    except TypeError as exc:
        raise ConfigError(f"the study's stored config is unreadable: {exc}") from None
