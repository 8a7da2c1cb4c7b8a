"""How a job fails, on the wire: an error code, one sentence naming the field, and whether to retry."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field


class ErrorCode(StrEnum):
    INVALID_INPUT = "INVALID_INPUT"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    TIMEOUT = "TIMEOUT"
    EXPIRED = "EXPIRED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL = "INTERNAL"
    # The job id already names a different request (same id, other candles or settings): the job under that
    # id keeps its answer, and this request is not run. Resend it under a new id.
    JOB_ID_CONFLICT = "JOB_ID_CONFLICT"
    # An operator took the job off its queue before any worker ran it (kronos-worker purge).
    PURGED = "PURGED"


# Only transient worker-side conditions are worth another attempt. Bad input stays bad, an expired job
# stays expired, a job that timed out would most likely time out again, and a rate-limited producer
# must back off rather than have the queue hammer the same limit.
RETRYABLE_CODES = frozenset({ErrorCode.MODEL_NOT_READY, ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.INTERNAL})


class JobError(BaseModel):
    """A failed job's report. Unknown fields are ignored so older readers accept newer workers' errors."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str = Field(description="One sentence naming the offending field.")
    field: str | None = Field(None, description="Dotted path of the offending field, e.g. 'candles.high'.")
    details: dict[str, Any] = Field(default_factory=dict, description="JSON-safe specifics, e.g. a row index.")
    job_id: str | None = None

    @computed_field
    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class JobFailed(Exception):
    """A job that fails with a structured error; `.error` is the report to hand back to the producer.

    Its one argument is the error as a JSON object: Celery's JSON result backend stores an exception's
    args, so `celery-task-meta-<id>` holds {"exc_type": "JobFailed", "exc_module": "schemas.errors",
    "exc_message": [{"code": ..., "message": ..., "field": ...}]} for any language to read, and a Python
    client that has imported `schemas` gets this exception back from `AsyncResult.get()`.
    """

    def __init__(self, error: JobError | dict[str, Any]) -> None:
        self.error = error if isinstance(error, JobError) else JobError.model_validate(error)
        super().__init__(self.error.model_dump(mode="json"))

    def __str__(self) -> str:
        return self.error.message

    def __reduce__(self) -> tuple[type[JobFailed], tuple[dict[str, Any]]]:
        return type(self), (self.error.model_dump(mode="json"),)

    @classmethod
    def of(
        cls,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        job_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> JobFailed:
        return cls(JobError(code=code, message=message, field=field, details=details or {}, job_id=job_id))

    @classmethod
    def invalid_input(
        cls,
        field: str | None,
        problem: str,
        *,
        job_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> JobFailed:
        error = JobError(
            code=ErrorCode.INVALID_INPUT,
            message=f"{field or 'payload'}: {problem}",
            field=field,
            details=details or {},
            job_id=job_id,
        )
        return cls(error)
