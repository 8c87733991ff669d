"""``POST /api/v1/jobs``: the request read as JSON or multipart, checked field by field
(``jobspec``), its uploads stored (``uploads``), the job queued (``store``). A refused request
leaves nothing queued and no upload kept."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from autocompress.errors import InputError
from autocompress.service import jobspec, uploads
from autocompress.service.store import Job, new_job_id

UPLOAD_FIELDS = jobspec.UPLOAD_FIELDS


class SubmitError(InputError):
    """A submission refused before the spec checks: the body's shape or content type."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def submit_job(state: Any, project: str) -> Job:
    body, files = _read_request()
    spec = jobspec.check_submission(
        body, files, allow_code=state.allow_code_upload,
        dataset_exists=lambda name: state.store.dataset_spec(name, project) is not None)
    job_id = new_job_id()
    try:
        if files:
            uploads.save_uploads(state.artifacts, job_id, files, state.upload_limits)
        return state.store.submit(project, spec, job_id=job_id)
    except BaseException:
        uploads.discard(state.artifacts, job_id)
        raise


def _read_request() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON spec, the uploaded files by field) of a JSON or multipart request."""
    kind = request.mimetype
    if kind == "application/json":
        return _parse_object(request.get_data(cache=True), "the request body"), {}
    if kind == "multipart/form-data":
        extra = sorted(set(request.form) - {"spec"})
        if extra:
            raise SubmitError(f"unknown form field {extra[0]!r}; send the job as JSON in the "
                              "field 'spec' and files in 'weights', 'data' or 'model_file'",
                              field=extra[0])
        if "spec" not in request.form:
            raise SubmitError("the multipart request has no 'spec' field; put the job's JSON "
                              "in a form field named spec", field="spec")
        body = _parse_object(request.form["spec"].encode(), "the 'spec' field")
        files: dict[str, Any] = {}
        for name in request.files:
            if name not in UPLOAD_FIELDS:
                raise SubmitError(f"unknown file field {name!r}; files go in "
                                  f"{', '.join(UPLOAD_FIELDS)}", field=name)
            if len(request.files.getlist(name)) > 1:
                raise SubmitError(f"send one file in {name!r}, not several", field=name)
            files[name] = request.files[name]
        return body, files
    raise SubmitError(f"unsupported content type {kind or 'none'!r}; send application/json, "
                      "or multipart/form-data with the JSON in 'spec' and the files",
                      status=415)


def _parse_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting
        raise SubmitError(f"{what} is not valid JSON ({exc}); send a JSON object such as "
                          '{"model": "demo", "data": "digits", "trials": 5}') from None
    if not isinstance(body, dict):
        raise SubmitError(f"{what} must be a JSON object of search options, not "
                          f"{type(body).__name__}")
    return body


__all__ = ["UPLOAD_FIELDS", "submit_job"]
