"""The documentation stays true to the code: the options reference in docs/cli.md is the one
SearchConfig renders, every option has a flag and a row, the README stays short, and every
relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autocompress.cli import build_parser
from autocompress.config import reference
from autocompress.config.options import config_keys
from autocompress.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
MAX_README_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _doc_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _broken_links(path: Path) -> list[str]:
    """Relative links (and images) in a Markdown file whose target file does not exist;
    links inside code are not links."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, an anchor in the same page
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(f"{path.relative_to(ROOT)}: {target}")
    return broken


def _search_parser_flags() -> dict[str, list[str]]:
    """Field name -> the `search` flags that set it."""
    parser = build_parser()
    search = parser._subparsers._group_actions[0].choices["search"]  # type: ignore[union-attr]
    flags: dict[str, list[str]] = {}
    for action in search._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    return flags


def test_the_options_reference_in_docs_is_the_rendered_one() -> None:
    written = reference.generated_section(CLI_DOC.read_text())
    assert written == reference.render_options(), (
        f"docs/cli.md's generated section is stale: run `{reference.COMMAND}`")


def test_every_config_field_has_a_search_flag_and_a_row_in_docs() -> None:
    flags = _search_parser_flags()
    missing_flags = [k for k in config_keys() if not flags.get(k)]
    assert missing_flags == []
    doc = CLI_DOC.read_text()
    undocumented = [f"{key} ({flag})" for key in config_keys() for flag in flags[key]
                    if not re.search(rf"`{re.escape(flag)}[` ]", doc)
                    or f"`{key}`" not in doc]
    assert undocumented == []


def test_the_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/")


def test_every_relative_link_in_the_docs_points_at_a_file() -> None:
    assert [b for path in _doc_files() for b in _broken_links(path)] == []


def test_the_link_check_finds_a_broken_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#part) [gone](missing.md) ![img](gone.png) "
                    "[web](https://example.com) [anchor](#top) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n")
    assert _broken_links(page) == ["page.md: missing.md", "page.md: gone.png"]


def test_a_stale_or_missing_generated_section_is_seen() -> None:
    rendered = reference.render_options()
    doc = f"intro\n{reference.START}\nold table\n{reference.END}\nafter\n"
    assert reference.generated_section(doc) != rendered
    updated = reference.replace_generated(doc, rendered)
    assert reference.generated_section(updated) == rendered
    assert updated.startswith("intro\n") and updated.endswith(f"{reference.END}\nafter\n")
    with pytest.raises(InputError):
        reference.generated_section("no markers here")


def test_the_rendered_reference_follows_the_fields() -> None:
    rendered = reference.render_options()
    assert "| `--budget LIMIT` | `budgets` | text, repeatable | none |" in rendered
    assert "| `--no-guided` | `guided` | switch | on |" in rendered
    assert "| `--bits` | `bits` | comma list of integers | `32,8,4` |" in rendered
    assert "sqlite:///studies/&lt;study&gt;.db" in rendered  # not read as an HTML tag


def test_the_reference_command_writes_and_checks(tmp_path: Path) -> None:
    doc = tmp_path / "cli.md"
    doc.write_text(f"# CLI\n\n{reference.START}\nstale\n{reference.END}\n")
    assert reference.main(["--check", str(doc)]) == 1
    assert reference.main(["--write", str(doc)]) == 0
    assert reference.main(["--check", str(doc)]) == 0
    assert doc.read_text().startswith("# CLI\n\n")
    assert reference.main(["--check", str(tmp_path / "absent.md")]) == 2
