"""Artifact stores: a shared folder or S3-compatible storage, and trial uploads/downloads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Protocol

import optuna
from optuna.artifacts import FileSystemArtifactStore

from autocompress.config.options import DEFAULT_STUDIES_DIR
from autocompress.errors import StudyError, one_line
from autocompress.study.urls import sqlite_path


class ArtifactStore(Protocol):
    """What Optuna's upload/download need (``optuna.artifacts`` stores all match it)."""

    def open_reader(self, artifact_id: str) -> IO[bytes]: ...

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


# "s3://bucket/prefix"; pathlib turns "//" into "/", so "s3:/bucket/prefix" means the same.
_S3_RE = re.compile(r"^s3:/{1,2}([^/]*)/*(.*?)/*$")


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _s3_parts(location: str) -> tuple[str, str] | None:
    match = _S3_RE.match(location)
    if match is None:
        return None
    bucket, prefix = match.groups()
    if not _BUCKET_RE.match(bucket):
        raise StudyError(f"artifact location {location!r} has no valid bucket name; write "
                         "s3://BUCKET/PREFIX, e.g. s3://ml-artifacts/autocompress/demo")
    return bucket, prefix


def is_remote_artifacts(location: str | Path | None) -> bool:
    return location is not None and _S3_RE.match(str(location)) is not None


def artifact_location(given: str | Path | None, storage_url: str, study_name: str) -> str:
    """Where a study's artifacts live, in the form to record in the study: an absolute folder
    or ``s3://bucket/prefix``. ``given`` is ``--artifacts``; None takes the default folder."""
    if given is not None and is_remote_artifacts(given):
        bucket, prefix = _s3_parts(str(given)) or ("", "")
        return f"s3://{bucket}/{prefix}".rstrip("/")
    folder = Path(given) if given else default_artifacts_dir(storage_url, study_name)
    return str(folder.resolve())


def default_artifacts_dir(storage_url: str, study_name: str) -> Path:
    """Artifacts sit beside a SQLite file (``x.db`` -> ``x-artifacts/``); for server
    databases the default is ``studies/<study>-artifacts`` and workers on other machines
    must share it (``--artifacts``)."""
    path = sqlite_path(storage_url)
    if path is not None:
        return path.with_name(path.stem + "-artifacts")
    return Path(DEFAULT_STUDIES_DIR) / f"{study_name}-artifacts"


class _PrefixedStore:
    """Keys under ``prefix/`` in a bucket shared with other data (Optuna's Boto3 store writes
    at the bucket root)."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix.strip("/") + "/"

    def open_reader(self, artifact_id: str) -> IO[bytes]:
        return self._store.open_reader(self._prefix + artifact_id)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        self._store.write(self._prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._prefix + artifact_id)


def _s3_store(bucket: str, prefix: str) -> ArtifactStore:
    location = f"s3://{bucket}/{prefix}".rstrip("/")
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StudyError(f"artifact store {location} needs boto3, which is not installed: "
                         "pip install boto3 (or use a shared folder: --artifacts PATH)") from None
    from optuna.artifacts import Boto3ArtifactStore

    # Endpoint, region, keys and retries come from the usual AWS_* settings; botocore already
    # retries throttling and transient network errors.
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise StudyError(f"cannot use artifact bucket {bucket!r} ({one_line(exc)}); check "
                         "the bucket exists, the AWS credentials, and AWS_ENDPOINT_URL for an "
                         "S3-compatible server such as MinIO") from None
    store = Boto3ArtifactStore(bucket, client=client)
    return _PrefixedStore(store, prefix) if prefix else store


def artifact_store(location: str | Path) -> ArtifactStore:
    """The store for a folder (created if missing) or ``s3://bucket/prefix`` (needs boto3)."""
    if is_remote_artifacts(location):
        bucket, prefix = _s3_parts(str(location)) or ("", "")
        return _s3_store(bucket, prefix)
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def upload(trial: optuna.Trial, store: ArtifactStore, path: Path) -> str:
    return optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(path), study_or_trial=trial
    )


def download(store: ArtifactStore, artifact_id: str, dest: Path) -> None:
    optuna.artifacts.download_artifact(
        artifact_store=store, artifact_id=artifact_id, file_path=str(dest)
    )
