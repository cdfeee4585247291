"""Response shapes and the error type every route raises.

Errors follow OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the openai client
surfaces the message unchanged.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ApiError(Exception):
    """A client-visible error: status code, one-line message, OpenAI error type, offending field."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or default_type(status)


def default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 409:
        return "conflict_error"
    if status == 413:
        return "request_too_large"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or default_type(status), "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Progress(BaseModel):
    stage: str | None
    layer: int | None
    layers_total: int | None
    fraction: float
    loss: float | None


class Callback(BaseModel):
    url: str
    status: str  # waiting (the job runs) | pending (a try is due) | sending | delivered | failed
    attempts: int
    error: str | None  # why the last try failed


class JobPublic(BaseModel):
    """What a quantization and an evaluation both are: a job record (app.jobs)."""

    id: str
    status: str
    config: dict[str, Any]
    files: dict[str, Any]
    progress: Progress
    error: str | None
    cancel_requested: bool
    attempts: int
    idempotency_key: str | None
    callback: Callback | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None


class QuantizationPublic(JobPublic):
    object: str = "quantization"
    source_model: str
    model: str | None  # the quantized model, once succeeded


class QuantizationList(BaseModel):
    object: str = "list"
    data: list[QuantizationPublic]
    has_more: bool
    last_id: str | None


class EvaluationPublic(JobPublic):
    object: str = "evaluation"
    model: str
    result: dict[str, Any] | None  # wer, rare_wer, common_wer (percent), counts, seconds, dtype, hypotheses


class EvaluationList(BaseModel):
    object: str = "list"
    data: list[EvaluationPublic]
    has_more: bool
    last_id: str | None


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    base_model: str
    method: str
    bits: int
    group_size: int
    size_bytes: int
    job_id: str | None
    metrics: dict[str, Any] | None
    info: dict[str, Any]


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class ModelFile(BaseModel):
    path: str
    size_bytes: int


class ModelFileList(BaseModel):
    object: str = "list"
    data: list[ModelFile]


class Deleted(BaseModel):
    id: str
    object: str = "model"
    deleted: bool = True


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}
