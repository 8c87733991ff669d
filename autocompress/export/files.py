"""Export's files on disk: the output folder check, all-or-nothing publishing, artifact fetch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from autocompress import study as study_mod
from autocompress.export._results import ExportError
from autocompress.runtime import measure
from autocompress.study.records import TrialRecord


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(
            f"output folder {str(out)!r} exists and is not empty; pass an empty or new folder, "
            "or --force to overwrite the export files in it"
        )
    _check_creatable(out.parent)


def _check_creatable(folder: Path) -> None:
    """The folder exists and is writable, or could be created: its nearest existing ancestor
    is a writable folder. Checked before any work, and without creating anything."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"cannot write under {str(folder)!r}: {str(probe)!r} is a file; pass "
                          "an --out path in a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write under {str(folder)!r}: {str(probe)!r} is not writable; "
                          "pass an --out path in a folder you can write to")


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished files into place: one rename when ``out`` is new or empty; with
    --force into a non-empty folder, file by file (other files in it are left alone)."""
    check_out(out, force)  # again: something may have written there meanwhile
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    for item in tmp.iterdir():
        if item.is_dir() and (out / item.name).is_dir():  # a target's folder (tensorrt/):
            shutil.rmtree(out / item.name)  # replaced whole, never merged with an old one
        os.replace(item, out / item.name)
    tmp.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _artifacts_dir(info: study_mod.StudyInfo, url: str, given: str | Path | None) -> str | Path:
    """The study's artifact folder, or its ``s3://bucket/prefix`` (checked when opened)."""
    location = given or info.attrs.get("artifacts_dir")
    if location and study_mod.is_remote_artifacts(location):
        return str(location)
    folder = Path(location) if location else study_mod.default_artifacts_dir(url, info.name)
    if not folder.is_dir():
        raise ExportError(
            f"artifact folder {str(folder)!r} of study {info.name!r} does not exist; pass "
            "--artifacts with the folder the search wrote to"
        )
    return folder


def _fetch(store: Any, record: TrialRecord, id_key: str, sha_key: str, dest: Path,
           what: str) -> None:
    """Download one artifact of a trial and check its sha256 against the study's record."""
    artifact_id = record.attrs.get(id_key)
    expected = record.attrs.get(sha_key)
    if not artifact_id or not expected:
        raise ExportError(
            f"trial {record.number} has no {what} recorded ({id_key}); it cannot be exported "
            "(it may come from an older autocompress: re-run the search)"
        )
    try:
        study_mod.download(store, str(artifact_id), dest)
    except Exception as exc:  # optuna raises ArtifactNotFound, or OSError
        raise ExportError(
            f"{what} {artifact_id} of trial {record.number} is missing from the artifact store "
            f"({type(exc).__name__}); pass --artifacts with the folder the search wrote to"
        ) from None
    actual = measure.sha256_file(dest)
    if actual != expected:
        raise ExportError(
            f"{what} {artifact_id} of trial {record.number} fails its checksum (sha256 "
            f"{actual[:16]}... != recorded {str(expected)[:16]}...): the stored file was "
            "modified or corrupted; restore it or re-run the search"
        )
