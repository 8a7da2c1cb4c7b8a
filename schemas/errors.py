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


class JobRejected(Exception):
    """Raised for a job that must not run; `.error` is the report to hand back to the producer."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error

    def __reduce__(self) -> tuple[type[JobRejected], tuple[JobError]]:
        # Exception pickles its args (the message); rebuild from the structured error instead.
        return type(self), (self.error,)

    @classmethod
    def invalid_input(
        cls,
        field: str | None,
        problem: str,
        *,
        job_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> JobRejected:
        error = JobError(
            code=ErrorCode.INVALID_INPUT,
            message=f"{field or 'payload'}: {problem}",
            field=field,
            details=details or {},
            job_id=job_id,
        )
        return cls(error)
