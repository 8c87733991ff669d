"""Errors a user can fix. The CLI prints ``str(error)`` on one line and exits with code 2.

Every message says what is wrong *and* how to fix it. Library callers get ``ValueError``
subclasses (``InputError``) for bad arguments, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class AutocompressError(Exception):
    """Base class: an error whose message is meant for the user, not a traceback."""


class InputError(AutocompressError, ValueError):
    """Bad user input: a spec, path, file, option or value that cannot be used."""


class ModelSpecError(InputError):
    """A model spec, factory or weights file that cannot be loaded."""


class DataSpecError(InputError):
    """A data spec or data folder that cannot be loaded or split."""


class ConfigError(InputError):
    """A study config with an unknown key or a value of the wrong type."""


class PlanError(InputError):
    """A compression plan that names an unknown layer or an unsupported value."""


class BudgetError(InputError):
    """A budget that cannot be parsed or cannot be met."""


class StudyError(InputError):
    """A study or storage that cannot be opened, or that does not match this search."""


class TrainingError(AutocompressError):
    """Fine-tuning diverged (NaN/inf loss) or could not run."""


def one_line(exc: BaseException, *, typed: bool = False, limit: int | None = 200,
             whole: bool = False) -> str:
    """An exception as one line of a message: its first non-empty line (``whole``: every
    line joined by spaces), or its type name when it says nothing; ``Type: text`` with
    ``typed``; cut to ``limit`` characters (None: no cut). Library errors can span pages
    (a torch trace, a SQL statement): a user's message must stay one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split()) if whole else (lines[0] if lines else "")
    if typed:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    elif not text:
        text = type(exc).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
