"""The OpenAPI 3.1 document of the service's ``/api/v1`` (served without a token, so a client
can discover the API before it has one)."""

from __future__ import annotations

from typing import Any

from autocompress import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_JOB_ID = {"name": "job_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"}}


def _answer(description: str, schema: dict[str, Any] | None = None,
            media: str = "application/json") -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "malformed request (the field at fault is named)", 401: "no or unknown token",
             404: "unknown job (another project's job answers the same)",
             409: "not possible in the job's current state", 413: "upload too large"}
    return {str(c): _answer(words[c], _ERROR) for c in codes}


def _job_paths() -> dict[str, Any]:
    job = {"type": "object", "properties": {"job": {"$ref": "#/components/schemas/Job"}}}
    spec_body = {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["spec"], "properties": {
            "spec": {"type": "string", "description": "the JobSpec as JSON"},
            "weights": {"type": "string", "format": "binary",
                        "description": "a state_dict (loaded weights_only)"},
            "data": {"type": "string", "format": "binary",
                     "description": ".zip / .tar.gz ImageFolder or .csv"},
            "model_file": {"type": "string", "format": "binary",
                           "description": "a .py factory (only with serve --allow-code-upload)"},
        }}},
    }
    return {
        "/api/v1/jobs": {
            "post": {"summary": "Submit a job", "requestBody": {"required": True,
                                                                "content": spec_body},
                     "responses": {"201": _answer("the queued job", job),
                                   **_errors(400, 401, 413)}},
            "get": {"summary": "The project's jobs, newest first",
                    "responses": {"200": _answer("jobs", {"type": "object", "properties": {
                        "project": {"type": "string"},
                        "jobs": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/Job"}}}}),
                        **_errors(401)}},
        },
        "/api/v1/jobs/{job_id}": {"get": {
            "summary": "A job: state, progress, Pareto front, failure reason, export state",
            "parameters": [_JOB_ID],
            "responses": {"200": _answer("the job", job), **_errors(401, 404)}}},
        "/api/v1/jobs/{job_id}/events": {"get": {
            "summary": "Server-sent events: state, trial, front, end",
            "parameters": [_JOB_ID],
            "responses": {"200": _answer("an event stream", {"type": "string"},
                                         "text/event-stream"), **_errors(401, 404)}}},
        "/api/v1/jobs/{job_id}/cancel": {"post": {
            "summary": "Cancel: a queued job at once, a running one after its current trial",
            "parameters": [_JOB_ID],
            "responses": {"200": _answer("the job", job), **_errors(401, 404)}}},
    }


def _export_paths() -> dict[str, Any]:
    choice = {"type": "object", "additionalProperties": False, "properties": {
        "best": {"type": "boolean", "description": "best within the budgets (default)"},
        "trial": {"type": "integer", "minimum": 0}}}
    return {
        "/api/v1/jobs/{job_id}/export": {
            "post": {"summary": "Start a verified export (as `autocompress export`)",
                     "parameters": [_JOB_ID],
                     "requestBody": {"required": False,
                                     "content": {"application/json": {"schema": choice}}},
                     "responses": {"202": _answer("export started; poll the job's export"),
                                   **_errors(400, 401, 404, 409)}},
            "get": {"summary": "The finished export as a .zip", "parameters": [_JOB_ID],
                    "responses": {"200": _answer("the export", {"type": "string",
                                                                "format": "binary"},
                                                 "application/zip"),
                                  **_errors(401, 404, 409)}},
        },
        "/api/v1/jobs/{job_id}/artifacts/{trial}/{name}": {"get": {
            "summary": "A trial's recorded artifact (model.onnx or state_dict.pt)",
            "parameters": [_JOB_ID,
                           {"name": "trial", "in": "path", "required": True,
                            "schema": {"type": "integer", "minimum": 0}},
                           {"name": "name", "in": "path", "required": True,
                            "schema": {"enum": ["model.onnx", "state_dict.pt"]}}],
            "responses": {"200": _answer("the file", {"type": "string", "format": "binary"},
                                         "application/octet-stream"),
                          **_errors(401, 404)}}},
    }


def _schemas() -> dict[str, Any]:
    return {
        "Error": {"type": "object", "required": ["error", "field"], "properties": {
            "error": {"type": "string", "description": "one line: what is wrong, how to fix"},
            "field": {"type": ["string", "null"]}}},
        "JobSpec": {"type": "object", "description": "search options as `autocompress search` "
                    "takes them (study, storage, artifacts, config and task are refused)",
                    "properties": {
                        "model": {"type": "string", "examples": ["demo", "torchvision:resnet18"]},
                        "data": {"type": "string", "examples": ["digits", "dataset:NAME"]},
                        "budgets": {"type": "array", "items": {"type": "string"},
                                    "examples": [["50ms", "4MB"]]},
                        "objectives": {"type": "array", "items": {"type": "string"}},
                        "trials": {"type": "integer", "minimum": 1},
                        "time_limit": {"type": "number", "description": "minutes"},
                        "target": {"type": "string"}, "seed": {"type": "integer"},
                        "finetune_steps": {"type": "integer"}},
                    "additionalProperties": True},
        "Job": {"type": "object", "properties": {
            "id": {"type": "string"}, "project": {"type": "string"},
            "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
            "error": {"type": ["string", "null"]},
            "progress": {"type": "object"}, "front": {"type": "array"},
            "export": {"type": "object", "properties": {
                "state": {"enum": ["none", "running", "done", "failed"]},
                "reason": {"type": ["string", "null"]}}}}},
    }


def openapi_document(server_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "autocompress service", "version": __version__,
                 "description": "Compression jobs for projects: submit, follow, export."},
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}, {"header": []}],
        "paths": {
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                             "responses": {"200": _answer("OpenAPI 3.1")}}},
            **_job_paths(),
            **_export_paths(),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a project token (autocompress admin token create)"},
                "header": {"type": "apiKey", "in": "header", "name": "X-Autocompress-Token"},
            },
            "schemas": _schemas(),
        },
    }


__all__ = ["openapi_document"]
