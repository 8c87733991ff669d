"""Bad paths and files: one line, exit 2, and nothing written where it should not be."""

from __future__ import annotations

from pathlib import Path

import pytest

from autocompress.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def _one_line(err: str) -> bool:
    return len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("error: ")


@pytest.mark.parametrize("command", [["list"], ["show", "--study", "s"],
                                     ["sensitivity", "--study", "s"],
                                     ["export", "--study", "s", "--best", "--out", "o"]])
def test_readers_refuse_a_file_that_is_not_a_study_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    for content in (b"", b"not a database at all"):
        path = tmp_path / "empty.db"
        path.write_bytes(content)
        code, err = _run(capsys, *command, "--storage", f"sqlite:///{path}")
        assert code == 2 and _one_line(err), err
        assert "not a study database" in err
        assert path.read_bytes() == content  # a reader never writes a schema into it


def test_storage_under_a_file_is_one_line(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, "search", "--storage", f"sqlite:///{blocker}/x.db", "--trials", "1")
    assert code == 2 and _one_line(err), err
    assert "--storage" in err and blocker.read_text() == "x"


def test_export_out_under_a_file_is_one_line(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path, short_study: object) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    url = short_study.storage_url  # type: ignore[attr-defined]
    name = short_study.study  # type: ignore[attr-defined]
    code, err = _run(capsys, "export", "--storage", url, "--study", name, "--best", "--out",
                     str(blocker / "sub"))
    assert code == 2 and _one_line(err), err
    assert "is a file" in err and blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
