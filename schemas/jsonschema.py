"""JSON Schemas of the wire formats, for producers and consumers not written in Python."""

from __future__ import annotations

from typing import Any

from schemas.errors import JobError
from schemas.request import ForecastRequest
from schemas.result import ForecastResult

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """{"request", "result", "error"} -> JSON Schema (draft 2020-12). The request is described as a worker
    accepts it; the result and error as a worker writes them (so `retryable` is included)."""
    return {
        "request": _with_dialect(ForecastRequest.model_json_schema(mode="validation")),
        "result": _with_dialect(ForecastResult.model_json_schema(mode="serialization")),
        "error": _with_dialect(JobError.model_json_schema(mode="serialization")),
    }


def _with_dialect(schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": DIALECT, **schema}
