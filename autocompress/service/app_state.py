"""What the service's app holds for its lifetime: the job store, the job studies' reader, the
export runner, and the operator's settings -- one object the routes share."""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from autocompress.service.app_export import Exports
from autocompress.service.app_study import JobStudies
from autocompress.service.store import Job, JobStore
from autocompress.service.uploads import UploadLimits

# A job id as the store makes them; anything else is answered like an unknown id.
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
# A known token is remembered this long (50 pollers must not each cost a token lookup);
# a revoked one is refused at the latest after it.
_TOKEN_TTL_S = 5.0
# The request body limit when the limits say nothing about sizes (uploads check their own).
_DEFAULT_REQUEST_BYTES = 512 * 1024 * 1024


class JobNotFound(LookupError):
    """An unknown id or another project's job: one answer for both."""

    def __init__(self, job_id: str) -> None:
        shown = job_id if JOB_ID.match(job_id) else "?"
        super().__init__(f"no job {shown} in this project; GET /api/v1/jobs lists its jobs")
        self.message = str(self)


@dataclasses.dataclass
class ServiceState:
    """The app's shared parts (one per app; the routes are its only users)."""

    store: JobStore
    storage_url: str
    artifacts: str
    allow_code_upload: bool
    upload_limits: Any
    studies: JobStudies
    exports: Exports
    max_request_bytes: int
    _tokens: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)

    def project_for_token(self, secret: str) -> str | None:
        now = time.monotonic()
        cached = self._tokens.get(secret)
        if cached is not None and now - cached[1] < _TOKEN_TTL_S:
            return cached[0]
        project = self.store.project_for_token(secret)
        if project is None:
            self._tokens.pop(secret, None)
            return None
        if len(self._tokens) > 10_000:  # bounded: unknown secrets are never cached
            self._tokens.clear()
        self._tokens[secret] = (project, now)
        return project

    def job(self, project: str, job_id: str) -> Job:
        """The project's job, or JobNotFound (also for another project's id)."""
        job = self.store.job(project, job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise JobNotFound(job_id)
        return job


def build_state(
    storage_url: str,
    *,
    artifacts: str | Path,
    allow_code_upload: bool,
    upload_limits: Any,
    work_dir: str | Path | None,
) -> ServiceState:
    store = JobStore(storage_url)
    folder = Path(work_dir) if work_dir is not None else Path(
        tempfile.mkdtemp(prefix="autocompress-service-"))
    location = str(artifacts)
    return ServiceState(
        store=store,
        storage_url=storage_url,
        artifacts=location,
        allow_code_upload=allow_code_upload,
        upload_limits=upload_limits,
        studies=JobStudies(storage_url, location),
        exports=Exports(storage_url, location, folder / "exports"),
        max_request_bytes=_request_limit(upload_limits),
    )


def _request_limit(limits: Any) -> int:
    """The whole request may hold every upload at its limit plus the JSON."""
    limits = UploadLimits() if limits is None else limits
    sizes = [v for k, v in dataclasses.asdict(limits).items()
             if k.endswith("bytes") and isinstance(v, int)] if dataclasses.is_dataclass(
        limits) else []
    return sum(sizes) + 1024 * 1024 if sizes else _DEFAULT_REQUEST_BYTES
