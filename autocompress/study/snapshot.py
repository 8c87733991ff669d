"""A run that fails before its first trial leaves nothing behind: what existed before it
opened its SQLite storage, and the clean-up of what it created."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from autocompress.study.storage import open_storage, study_names
from autocompress.study.urls import sqlite_path


@dataclass(frozen=True)
class StorageSnapshot:
    """What existed before a run opened its SQLite storage (see ``no_half_made_study``)."""

    url: str
    study: str
    file_existed: bool
    study_existed: bool
    missing_dirs: tuple[Path, ...]  # folders the run may create, innermost first
    artifacts: Path | None = None  # the artifact folder, when the run would create it


def storage_snapshot(url: str, study_name: str,
                     artifacts: str | None = None) -> StorageSnapshot | None:
    """Take it before the storage is opened (opening creates the file); None for server
    databases, where other workers may be creating the same study right now. ``artifacts``:
    the run's artifact location (a folder is removed again if the run made it, empty)."""
    path = sqlite_path(url)
    if path is None:
        return None
    file_existed = path.exists()
    before = _names_or_none(url) if file_existed else []
    folder = Path(artifacts) if artifacts and "://" not in artifacts else None
    return StorageSnapshot(url, study_name, file_existed,
                           before is None or study_name in before,  # unknown: never delete
                           tuple(_missing_parents(path)),
                           folder if folder is not None and not folder.exists() else None)


@contextlib.contextmanager
def no_half_made_study(snapshot: StorageSnapshot | None) -> Iterator[None]:
    """A run that fails before recording any trial leaves nothing behind: the study it
    created (a bad model, data or budget is found after the study exists) is deleted, and
    the SQLite file it created, with no study left in it, is removed with its lock file and
    the folders made for it. A study that existed before, or recorded a trial, is never
    touched. Enter it while holding the SQLite worker lock (no other writer then)."""
    try:
        yield
    except BaseException:
        if snapshot is not None:
            with contextlib.suppress(Exception):  # clean-up must never hide the real error
                _clean_up(snapshot)
        raise


def _clean_up(snapshot: StorageSnapshot) -> None:
    storage = open_storage(snapshot.url, heartbeat=False, create=False)
    _discard(storage, snapshot.study, snapshot.study_existed)
    if snapshot.artifacts is not None and snapshot.artifacts.is_dir():
        with contextlib.suppress(OSError):  # not empty: files were uploaded, keep them
            snapshot.artifacts.rmdir()
    if snapshot.file_existed or study_names(storage):
        return
    storage.engine.dispose()
    path = sqlite_path(snapshot.url)
    assert path is not None  # a snapshot is only taken of SQLite storages
    for leftover in (path, path.with_name(path.name + ".lock")):
        leftover.unlink(missing_ok=True)
    for folder in snapshot.missing_dirs:
        folder.rmdir()


def _names_or_none(url: str) -> list[str] | None:
    try:
        return study_names(open_storage(url, heartbeat=False, create=False))
    except Exception:
        return None


def _discard(storage: BaseStorage, study_name: str, existed: bool) -> None:
    if existed or study_name not in study_names(storage):
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    if not study.get_trials(deepcopy=False):
        optuna.delete_study(study_name=study_name, storage=storage)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, innermost first."""
    out = []
    folder = path.absolute().parent
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out
