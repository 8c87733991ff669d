"""The Optuna adapter: storage URLs, study creation and resume, samplers, artifacts, records.

Everything that knows Optuna's API lives here (the search space's ``suggest_*`` calls are in
``model/space.py`` behind a protocol), so an Optuna upgrade touches this package.

Scale-out. Several ``autocompress search`` processes ("workers"), on one machine or many, share
one study when they share a PostgreSQL ``--storage``:

- ``--trials N`` means N search trials *per worker*: three workers with ``--trials 4`` add 12.
  The fp32 and int8-PTQ baselines are recorded once per study, on top.
- Creating the schema and the study is retried, so workers may start at the same instant
  (Optuna #4621: concurrent ``CREATE TABLE`` fails with ``UniqueViolation``).
- Trial numbers come from the database, so they are unique across workers.
- Heartbeats: a running trial beats every ``AUTOCOMPRESS_HEARTBEAT_INTERVAL`` s (default 10);
  one silent for ``AUTOCOMPRESS_GRACE_PERIOD`` s (default 30) belongs to a dead worker. The next
  worker to start a trial (or to start at all) marks it FAIL and queues it once more with the
  same parameters (``RetryHeartbeatStaleTrialCallback(max_retry=1)``; the retry carries the
  system attribute ``failed_trial``), and a surviving worker runs it as one of its N trials.
- A lost database connection is retried with exponential back-off for up to
  ``AUTOCOMPRESS_DB_RETRY_SECONDS`` (default 30); after that the worker stops with one
  ``StudyError`` line. Finished trials are committed one by one, so the study is consistent and
  the same command resumes it (trial numbers continue).
- Artifacts go to a folder every worker and the dashboard can reach (``--artifacts PATH`` on a
  shared filesystem) or to S3-compatible object storage (``--artifacts s3://bucket/prefix``,
  needs boto3; ``AWS_ENDPOINT_URL`` points it at MinIO and friends).
- SQLite serves one worker: a second one is refused with a message naming PostgreSQL.

The package by job: ``urls`` (the SQLite URL parser, drivers, masked URLs), ``storage``
(settings, opening a storage, the SQLite lock), ``resilient`` (the outage-proof connection),
``studies`` (create/resume, samplers), ``worker`` (the worker's study), ``queue`` (queued
trials, locks), ``snapshot`` (no half-made study), ``artifacts`` (folder or S3 stores) and
``records`` (plain-data trial and study records).

Layer 2. May import: ``errors``, ``config``.
"""

from __future__ import annotations

from autocompress.study.artifacts import (
    ArtifactStore,
    artifact_location,
    artifact_store,
    default_artifacts_dir,
    download,
    is_remote_artifacts,
    upload,
)
from autocompress.study.queue import enqueue, enqueue_baselines, enqueue_once, study_lock
from autocompress.study.records import (
    StudyInfo,
    records,
    study_info,
    to_record,
)
from autocompress.study.resilient import DB_RETRY_S, is_connection_error
from autocompress.study.snapshot import no_half_made_study, storage_snapshot
from autocompress.study.storage import (
    ENV_DB_RETRY,
    ENV_GRACE_PERIOD,
    ENV_HEARTBEAT_INTERVAL,
    GRACE_PERIOD_S,
    HEARTBEAT_INTERVAL_S,
    WorkerSettings,
    open_storage,
    single_sqlite_worker,
    worker_settings,
)
from autocompress.study.studies import (
    METRIC_NAMES,
    TrialPruned,
    create_or_load_study,
    directions,
    load_existing_study,
    make_sampler,
    set_study_info,
    stored_space,
    study_summaries,
)
from autocompress.study.urls import driver_url, masked_url, sqlite_path
from autocompress.study.worker import QUEUE_FIRST_ATTR, fail_stale_trials

__all__ = [
    "DB_RETRY_S",
    "ENV_DB_RETRY",
    "ENV_GRACE_PERIOD",
    "ENV_HEARTBEAT_INTERVAL",
    "GRACE_PERIOD_S",
    "HEARTBEAT_INTERVAL_S",
    "METRIC_NAMES",
    "QUEUE_FIRST_ATTR",
    "ArtifactStore",
    "StudyInfo",
    "TrialPruned",
    "WorkerSettings",
    "artifact_location",
    "artifact_store",
    "create_or_load_study",
    "default_artifacts_dir",
    "directions",
    "download",
    "driver_url",
    "enqueue",
    "enqueue_baselines",
    "enqueue_once",
    "fail_stale_trials",
    "is_connection_error",
    "is_remote_artifacts",
    "load_existing_study",
    "make_sampler",
    "masked_url",
    "no_half_made_study",
    "open_storage",
    "records",
    "set_study_info",
    "single_sqlite_worker",
    "sqlite_path",
    "storage_snapshot",
    "stored_space",
    "study_info",
    "study_lock",
    "study_summaries",
    "to_record",
    "upload",
    "worker_settings",
]
