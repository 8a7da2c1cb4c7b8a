"""`validate_job`: the one gate a worker puts in front of every incoming job."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import date, datetime, time
from typing import Any

from pydantic import ValidationError

from schemas.error_translation import job_error_from_validation
from schemas.errors import JobFailed
from schemas.limits import Limits
from schemas.request import JOB_ID_PATTERN, ForecastRequest

_MAX_REASON_CHARS = 80
_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


# What a request says about its delivery, not about what to compute: the same request sent again with its id
# added, another priority or deadline, or another informational producer name is the same job.
DELIVERY_FIELDS = frozenset({"job_id", "priority", "deadline", "producer"})


def job_digest(job: ForecastRequest | Any) -> str:
    """The identity of what a job computes: the SHA-256 of the canonical JSON of the validated request (defaults
    filled in, so a field left out and the same field sent with its default value agree) without its delivery
    fields. A payload that does not validate is digested as sent. Producer client and worker use this one
    function, so a job record and the message it describes always agree."""
    if isinstance(job, ForecastRequest):
        document = job.model_dump(mode="json", exclude=DELIVERY_FIELDS)
    elif isinstance(job, dict):
        document = {key: value for key, value in job.items() if key not in DELIVERY_FIELDS}
    else:
        document = job
    try:
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=_encode_temporal)
    except (TypeError, ValueError, RecursionError):  # not JSON at all: still one stable identity per payload
        canonical = repr(document)
    return hashlib.sha256(canonical.encode(errors="surrogatepass")).hexdigest()


def validate_job(payload: dict[str, Any] | str | bytes, limits: Limits | None = None) -> ForecastRequest:
    """Parse and check one job: a decoded JSON object, or raw JSON text/bytes. The size limit applies
    before anything is parsed. Any problem raises `JobFailed` (INVALID_INPUT) naming the first bad
    field. `limits` defaults to `Limits()`, not the environment: the caller owns configuration."""
    limits = Limits() if limits is None else limits
    document = _decode(payload, limits.max_payload_bytes)
    job_id = _claimed_job_id(document)
    try:
        request = ForecastRequest.model_validate(document)
    except ValidationError as exc:
        raise JobFailed(job_error_from_validation(exc, job_id=job_id)) from None
    request.check_limits(limits)
    return request


def _decode(payload: Any, max_bytes: int) -> dict[str, Any]:
    if isinstance(payload, str | bytes | bytearray):
        _check_size(payload, max_bytes)
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise JobFailed.invalid_input(None, f"is not valid JSON ({_reason(exc)})") from None
    else:
        document = payload
        _check_size(_canonical_json(payload), max_bytes)
    if not isinstance(document, dict):
        kind = _JSON_TYPE_NAMES.get(type(document), "null" if document is None else type(document).__name__)
        raise JobFailed.invalid_input(None, f"must be a JSON object, got {kind}")
    return document


def _canonical_json(document: Any) -> str:
    try:
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=_encode_temporal)
    except (TypeError, ValueError, RecursionError) as exc:
        raise JobFailed.invalid_input(None, f"is not JSON-serializable ({_reason(exc)})") from None


def _encode_temporal(value: Any) -> str:
    # kombu's JSON decoder turns date-times back into datetime objects, so a decoded job may hold them.
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def _check_size(payload: str | bytes | bytearray, max_bytes: int) -> None:
    # A str has at least as many UTF-8 bytes as characters: the cheap bound rejects huge text unencoded.
    size = len(payload)
    if isinstance(payload, str) and size <= max_bytes:
        size = len(payload.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise JobFailed.invalid_input(
            None,
            f"is larger than the max_payload_bytes limit of {max_bytes} bytes",
            details={"limit": "max_payload_bytes", "limit_value": max_bytes},
        )


def _claimed_job_id(document: dict[str, Any]) -> str | None:
    """The job_id to echo in an error, if the payload carries a well-formed one."""
    job_id = document.get("job_id")
    if isinstance(job_id, str) and len(job_id) <= 128 and re.fullmatch(JOB_ID_PATTERN, job_id):
        return job_id
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."
