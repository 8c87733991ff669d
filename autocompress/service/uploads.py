"""A job's uploaded files: kept in the artifact store under ``service-uploads/<job>/``
(a shared folder or S3, so any worker can fetch them), size limits enforced while the upload
streams, archives whose members could leave their folder refused (when stored and when
extracted), and weights that must load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from autocompress.errors import InputError, one_line
from autocompress.service.jobspec import (
    ARCHIVE_SUFFIXES,
    TEXT_SUFFIXES,
    UPLOAD_FIELDS,
    JobSpecError,
    upload_name,
    upload_paths,
)
from autocompress.study.artifacts import artifact_store, is_remote_artifacts

PREFIX = "service-uploads"
_MB = 1024 * 1024
_CHUNK = 1024 * 1024
# An archive may expand to at most this many times the data limit, in this many members
# (a zip bomb is refused while it extracts, not after it filled the disk).
EXPANSION = 10
MAX_MEMBERS = 200_000
# What a damaged archive raises while read (a truncated .tar.gz: EOFError; a bad deflate
# stream: zlib.error; an encrypted zip: RuntimeError; an unknown method: NotImplementedError).
_BROKEN = (tarfile.TarError, EOFError, OSError, zlib.error, zipfile.BadZipFile, RuntimeError,
           NotImplementedError)
# Jobs' uploads materialised on this machine: one fixed folder per job, so the model and
# data specs a job's study records are the same on every turn and worker (and for export).
JOBS_FOLDER = "autocompress-jobs"
_COMPLETE = ".complete"


@dataclass(frozen=True)
class UploadLimits:
    """The largest upload accepted per file field, in bytes."""

    data_bytes: int = 200 * _MB
    weights_bytes: int = 500 * _MB
    code_bytes: int = 1 * _MB

    def for_field(self, field: str) -> int:
        return {"data": self.data_bytes, "weights": self.weights_bytes,
                "model_file": self.code_bytes}[field]


def _key(job_id: str, field: str) -> str:
    return f"{PREFIX}/{job_id}/{field}"


def save_uploads(artifacts_location: str, job_id: str, files: Mapping[str, Any],
                 limits: UploadLimits | None = None) -> dict[str, str]:
    """Store each upload (``(filename, stream)`` or an object with ``.filename`` and
    ``.stream``) under ``service-uploads/<job_id>/<field>``; {field: file name}. A file over
    its limit stops being read there and is a JobSpecError; nothing of the job is kept then."""
    limits = limits or UploadLimits()
    if not files:
        return {}
    store = artifact_store(artifacts_location)
    if not is_remote_artifacts(artifacts_location):
        (Path(artifacts_location) / PREFIX / job_id).mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    try:
        for field, value in files.items():
            name = upload_name(field, value)
            stream = value[1] if isinstance(value, tuple) else getattr(value, "stream", value)
            with _spooled(stream, field, limits.for_field(field)) as handle:
                if field == "data" and name.lower().endswith(ARCHIVE_SUFFIXES):
                    _check_archive(handle, name, limits.data_bytes * EXPANSION)
                    handle.seek(0)
                store.write(_key(job_id, field), handle)
            saved[field] = name
    except BaseException:
        discard(artifacts_location, job_id)
        raise
    return saved


@contextlib.contextmanager
def _spooled(stream: IO[bytes], field: str, limit: int) -> Iterator[IO[bytes]]:
    """The upload copied into a temporary file, reading no more than ``limit`` + 1 bytes."""
    with tempfile.TemporaryFile() as handle:
        size = 0
        while True:
            chunk = stream.read(min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise JobSpecError(f"the upload in {field} is over its limit of "
                                   f"{_size(limit)}; send a smaller file (the operator sets "
                                   "the limits of serve)", field)
            handle.write(chunk)
        if size == 0:
            raise JobSpecError(f"the upload in {field} is empty; send the file's content",
                               field)
        handle.seek(0)
        yield handle


def _size(n: int) -> str:
    if n >= _MB:
        return f"{n / _MB:.4g} MB"
    return f"{n / 1024:.4g} KB" if n >= 1024 else f"{n} bytes"


def discard(artifacts_location: str, job_id: str) -> None:
    """Remove a job's uploads (those that exist)."""
    try:
        store = artifact_store(artifacts_location)
    except InputError:
        return
    for field in UPLOAD_FIELDS:
        with contextlib.suppress(Exception):  # not there, or already gone
            store.remove(_key(job_id, field))
    if not is_remote_artifacts(artifacts_location):
        folder = Path(artifacts_location) / PREFIX / job_id
        with contextlib.suppress(OSError):
            folder.rmdir()


def materialize(artifacts_location: str, job_id: str, spec: Mapping[str, Any],
                dest: Path, limits: UploadLimits | None = None) -> dict[str, Path]:
    """Fetch the job's uploads into ``dest`` where ``jobspec.upload_paths`` says, extracting
    an archive (safely) and checking weights load with ``weights_only=True``; an InputError
    names what is wrong (the job fails with it)."""
    paths = upload_paths(spec, dest)
    if not paths:
        return paths
    store = artifact_store(artifacts_location)
    dest.mkdir(parents=True, exist_ok=True)
    for field, name in dict(spec.get("uploads") or {}).items():
        target = paths[field]
        fetched = dest / f".{field}.download"
        try:
            # S3's streaming body is closed, not used as a context manager
            with contextlib.closing(store.open_reader(_key(job_id, field))) as reader, \
                    fetched.open("wb") as out:
                shutil.copyfileobj(reader, out)
        except Exception as exc:
            raise JobSpecError(f"the job's uploaded {field} {name!r} cannot be read from the "
                               f"artifact store ({one_line(exc)}); submit the job again",
                               field) from None
        if field == "data" and not name.lower().endswith(TEXT_SUFFIXES):
            _extract(fetched, name, target, (limits or UploadLimits()).data_bytes * EXPANSION)
            fetched.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fetched.replace(target)
        if field == "weights":
            _check_weights(target, name)
    return paths


def job_files_dir(job_id: str) -> Path:
    """Where the job's uploads lie on this machine (the same path on every worker)."""
    if not re.fullmatch(r"[0-9a-f]{12}", job_id):
        raise InputError(f"job id {job_id!r} is invalid")
    return Path(tempfile.gettempdir()) / JOBS_FOLDER / job_id


def materialize_job(artifacts_location: str, job_id: str, spec: Mapping[str, Any],
                    limits: UploadLimits | None = None) -> Path:
    """The job's uploads in ``job_files_dir``: reused when complete, else fetched into a
    sibling folder and renamed there (atomic: a reader never sees half of it; two workers
    racing both finish and one rename wins)."""
    folder = job_files_dir(job_id)
    if (folder / _COMPLETE).is_file() or not spec.get("uploads"):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{job_id}.", dir=folder.parent))
    try:
        materialize(artifacts_location, job_id, spec, partial, limits)
        (partial / _COMPLETE).touch()
        if folder.exists() and not (folder / _COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # left half-made by an older version
        with contextlib.suppress(OSError):  # another worker's rename won: use its copy
            os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def remove_job_files(job_id: str) -> None:
    """Delete the job's uploads from this machine (the job has ended)."""
    with contextlib.suppress(InputError):
        shutil.rmtree(job_files_dir(job_id), ignore_errors=True)


def _check_weights(path: Path, name: str) -> None:
    """The weights must be a state_dict (or a checkpoint holding one) that loads with
    ``weights_only=True``: nothing in them is unpickled as code."""
    from autocompress.intake.models import read_state_dict  # torch: on a worker only

    try:
        read_state_dict(path)
    except InputError as exc:
        message = str(exc).replace(f"weights file {path}", f"uploaded weights {name!r}")
        raise JobSpecError(message.replace("--weights", "the upload"), "weights") from None


# -- archives ------------------------------------------------------------------------------

def _members(handle: IO[bytes], name: str) -> Iterator[tuple[str, str, int]]:
    """(member name, kind: file | dir | other, size) of a zip or tar archive."""
    if name.lower().endswith(".zip"):
        try:
            archive = zipfile.ZipFile(handle)
        except _BROKEN as exc:
            raise JobSpecError(f"uploaded data {name!r} is not a readable zip "
                               f"({one_line(exc)}); send a .zip or .tar.gz of the ImageFolder",
                               "data") from None
        for info in archive.infolist():
            mode = info.external_attr >> 16
            kind = "dir" if info.is_dir() else "file"
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "other"  # a symlink or a device stored in the zip
            yield info.filename, kind, info.file_size
        return
    try:
        with tarfile.open(fileobj=handle, mode="r:*") as archive:
            for member in archive:
                kind = "file" if member.isreg() else "dir" if member.isdir() else "other"
                yield member.name, kind, member.size
    except _BROKEN as exc:
        raise JobSpecError(f"uploaded data {name!r} is not a readable tar archive "
                           f"({one_line(exc)}); send a .zip or .tar.gz of the ImageFolder",
                           "data") from None


def _safe_member(member: str, kind: str, root: Path) -> Path:
    """Where ``member`` extracts under ``root``; refused when it could leave it."""
    pure = PurePosixPath(member.replace("\\", "/"))
    why = None
    if kind == "other":
        why = "is a link or a device file, not a file or folder"
    elif not pure.parts:
        why = "has no name"
    elif pure.is_absolute() or re.match(r"[A-Za-z]:", member):
        why = "has an absolute path"
    elif ".." in pure.parts:
        why = "escapes its folder ('..')"
    target = (root / pure).resolve()
    if why is None and not target.is_relative_to(root.resolve()):
        why = "escapes its folder"
    if why is not None:
        raise JobSpecError(f"uploaded data archive member {member!r} {why}; rebuild the "
                           "archive from the dataset folder with relative paths only "
                           "(e.g. zip -r data.zip train val)", "data")
    return target


def _check_archive(handle: IO[bytes], name: str, max_bytes: int) -> None:
    """Refuse an archive with a member that could escape, or that expands too far."""
    total = count = 0
    root = Path("/archive-root")
    for member, kind, size in _members(handle, name):
        _safe_member(member, kind, root)
        total += size
        count += 1
        if total > max_bytes or count > MAX_MEMBERS:
            raise JobSpecError(f"uploaded data {name!r} expands to more than "
                               f"{_size(max_bytes)} or {MAX_MEMBERS} files; send a smaller "
                               "dataset", "data")


def _extract(archive_path: Path, name: str, dest: Path, max_bytes: int) -> None:
    """``_extract_members``, a damaged archive a JobSpecError naming the data field."""
    try:
        _extract_members(archive_path, name, dest, max_bytes)
    except _BROKEN as exc:
        raise JobSpecError(f"uploaded data {name!r} cannot be extracted ({one_line(exc)}); "
                           "send an intact .zip or .tar.gz of the ImageFolder", "data") from None


def _extract_members(archive_path: Path, name: str, dest: Path, max_bytes: int) -> None:
    """Extract member by member into ``dest``, each checked, bytes counted as written."""
    dest.mkdir(parents=True, exist_ok=True)
    budget = [max_bytes]
    with archive_path.open("rb") as handle:
        checked = [(_safe_member(m, k, dest), m, k) for m, k, _ in _members(handle, name)]
        handle.seek(0)
        if name.lower().endswith(".zip"):
            with zipfile.ZipFile(handle) as archive:
                for target, member, kind in checked:
                    _write_member(target, kind, lambda m=member: archive.open(m), budget)
            return
        with tarfile.open(fileobj=handle, mode="r:*") as archive:
            by_name = {m.name: m for m in archive.getmembers()}
            for target, member, kind in checked:
                _write_member(target, kind,
                              lambda m=member: archive.extractfile(by_name[m]), budget)


def _write_member(target: Path, kind: str, opener: Any, budget: list[int]) -> None:
    if kind == "dir":
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = opener()
    if source is None:
        return
    with source, target.open("wb") as out:
        while chunk := source.read(_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise JobSpecError("the uploaded data archive expands too far; send a "
                                   "smaller dataset", "data")
            out.write(chunk)


__all__ = ["PREFIX", "UploadLimits", "discard", "job_files_dir", "materialize",
           "materialize_job", "remove_job_files", "save_uploads"]
