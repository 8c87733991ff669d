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


def _ends_in_one_line(err: str) -> bool:
    """After the run's progress notes (a failure found once the model is loaded)."""
    return "Traceback" not in err and err.splitlines()[-1].startswith("error: ")


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


@pytest.mark.parametrize("args, says", [
    (["--budget", "-5ms"], "must be positive"),
    (["--budget", "-0.5MB"], "must be positive"),
    (["--study", "s" * 300], "at most 120"),
    (["--model", "demo"], "leave out --model and --data"),
])
def test_messages_say_what_to_do(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 args: list[str], says: str) -> None:
    db = tmp_path / "sub" / "x.db"
    code, err = _run(capsys, "search", "--storage", f"sqlite:///{db}", "--trials", "1", *args)
    assert code == 2 and _one_line(err), err
    assert says in err and "expected one argument" not in err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_failed_start_leaves_no_study_file_or_folder(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    """A bad model or budget is found after the study exists: the run takes it back."""
    db = tmp_path / "new" / "x.db"
    model = tmp_path / "m.py"
    model.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    code, err = _run(capsys, "search", "--storage", f"sqlite:///{db}", "--trials", "1",
                     "--budget", "1us")
    assert code == 2 and _ends_in_one_line(err) and "below the fastest candidate" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]  # no db, lock or folders
    code, err = _run(capsys, "search", "--storage", f"sqlite:///{db}", "--trials", "1",
                     "--model", f"{model}:missing", "--data", "digits")
    assert code == 2 and _ends_in_one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py"]


def test_a_failed_start_keeps_what_the_database_already_held(
    capsys: pytest.CaptureFixture[str], short_study: object
) -> None:
    import optuna

    url = short_study.storage_url  # type: ignore[attr-defined]
    before = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}
    code, err = _run(capsys, "search", "--storage", url, "--study", "another", "--trials", "1",
                     "--budget", "1us")
    assert code == 2 and _ends_in_one_line(err), err
    # the new study is gone again (the same command with a sane budget starts afresh)
    after = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}
    assert after == before
