"""The ``search`` options reference as Markdown, rendered from ``SearchConfig``'s fields.

Each field carries its help text and its ``group`` (see ``options._opt``), and the flag is
derived from the field as ``flags`` derives it, so the reference cannot drift from the
parser. ``docs/cli.md`` holds the rendered part between two markers; regenerate it with

    python -m autocompress.config.reference --write docs/cli.md

(``--check docs/cli.md`` exits 1 when that section is stale; no argument prints it).
Layer 1: imports only ``autocompress.config`` and ``autocompress.errors`` (never the CLI).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autocompress.config.flags import base_type, flag_of
from autocompress.config.options import SearchConfig
from autocompress.errors import InputError

COMMAND = "python -m autocompress.config.reference --write docs/cli.md"
START = f"<!-- generated: {COMMAND} -->"
END = "<!-- end generated -->"

# Headings of the field groups, in the order they are shown; a group missing here is shown
# after these under its own name, so a new group is never left out.
GROUP_TITLES = {
    "model": "What to compress",
    "task": "Your own task, input normalisation",
    "storage": "Where the study lives",
    "search": "The search: objectives, limits, space, fine-tune, measurement",
}
_ITEM_NAMES = {int: "integers", float: "numbers", str: "names"}
_SCALAR_NAMES = {int: "integer", float: "number", str: "text"}


def _type_name(field: dataclasses.Field[Any], hint: Any) -> str:
    base = base_type(hint)
    if base is bool:
        return "switch"
    if typing.get_origin(base) is tuple:
        if field.metadata.get("flag"):  # a singular flag that fills a tuple (--budget)
            return "text, repeatable"
        return f"comma list of {_ITEM_NAMES.get(typing.get_args(base)[0], 'values')}"
    return _SCALAR_NAMES.get(base, getattr(base, "__name__", str(base)))


def _default(field: dataclasses.Field[Any]) -> str:
    value = field.default
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return f"`{','.join(str(v) for v in value)}`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def _flag(field: dataclasses.Field[Any]) -> str:
    flag = flag_of(field)
    metavar = field.metadata.get("metavar")
    return f"`{flag} {metavar}`" if metavar else f"`{flag}`"


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, ``<study>`` shown rather than read as HTML."""
    text = " ".join(text.split()).replace("<", "&lt;")
    return text.replace(">", "&gt;").replace("|", "\\|")


def _groups() -> dict[str, list[dataclasses.Field[Any]]]:
    groups: dict[str, list[dataclasses.Field[Any]]] = {g: [] for g in GROUP_TITLES}
    for field in dataclasses.fields(SearchConfig):
        groups.setdefault(str(field.metadata.get("group", "search")), []).append(field)
    return {g: fields for g, fields in groups.items() if fields}


def render_options() -> str:
    """The reference of every ``SearchConfig`` field: flag, YAML key, type, default, help."""
    hints = typing.get_type_hints(SearchConfig)
    source = SearchConfig.__module__.replace(".", "/") + ".py"
    lines = [f"Rendered from `SearchConfig`'s fields (`{source}`): edit the help text there, "
             "then run", "", "```bash", COMMAND, "```"]
    for group, fields in _groups().items():
        lines += ["", f"### {GROUP_TITLES.get(group, group)}", "",
                  "| flag | YAML key | type | default | meaning |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_flag(f)} | `{f.name}` | {_type_name(f, hints[f.name])} | "
                  f"{_cell(_default(f))} | {_cell(str(f.metadata.get('help', '')))} |"
                  for f in fields]
    return "\n".join(lines) + "\n"


def _bounds(text: str) -> tuple[int, int]:
    """Character offsets of the generated section's body (between the two markers)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise InputError(f"the generated section is missing: the file needs a line {START!r} "
                         f"and, after it, a line {END!r}")
    return start + len(START), end


def generated_section(text: str) -> str:
    """The body between the markers, without the blank lines around it."""
    start, end = _bounds(text)
    return text[start:end].strip("\n") + "\n"


def replace_generated(text: str, rendered: str) -> str:
    """``text`` with the body between the markers replaced by ``rendered``."""
    start, end = _bounds(text)
    return f"{text[:start]}\n\n{rendered.strip(chr(10))}\n\n{text[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autocompress.config.reference",
                                     description="Render the `search` options reference.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write", metavar="PATH", help="rewrite the generated section in place")
    where.add_argument("--check", metavar="PATH", help="exit 1 when that section is stale")
    args = parser.parse_args(argv)
    rendered = render_options()
    path = Path(args.write or args.check or "")
    if not (args.write or args.check):
        sys.stdout.write(rendered)
        return 0
    try:
        text = path.read_text()
        updated = replace_generated(text, rendered)
    except (OSError, InputError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if generated_section(text) != rendered:
            print(f"{path} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        path.write_text(updated)
    return 0


__all__ = ["COMMAND", "END", "START", "generated_section", "render_options",
           "replace_generated"]

if __name__ == "__main__":
    sys.exit(main())
