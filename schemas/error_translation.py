"""Both halves of one convention: validators raise `field_error` to blame a precise field (and row),
and `job_error_from_validation` turns pydantic's error list into one readable `JobError`."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from schemas.errors import ErrorCode, JobError

_FIELD_ERROR = "invalid_field"
# A payload of 100k bad numbers yields 100k pydantic errors; the report keeps a sample.
_MAX_REPORTED_ERRORS = 20
_MAX_RENDERED_CHARS = 60

# Pydantic phrases errors about "Input"; the report names the field first, so speak about it instead.
_PHRASE_REWRITES = (
    ("Input should be ", "must be "),
    ("Input should ", "must "),
    ("String should ", "must "),
    ("List should ", "must "),
    ("Value error, ", ""),
)
_MESSAGES_BY_TYPE = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "model_type": "must be a JSON object",
    "list_type": "must be an array",
}
# Errors whose message already says everything about the input.
_NO_INPUT_ECHO = {"missing", "extra_forbidden", _FIELD_ERROR}


def field_error(subpath: str, message: str, *, row: int | None = None) -> PydanticCustomError:
    """An error for a model validator to raise that blames `subpath` (relative to the model) and,
    for column data, the first offending row."""
    context: dict[str, Any] = {"subpath": subpath}
    if row is not None:
        context["row"] = row
    # Last, so the template substitution of the other keys cannot touch text inside the message.
    context["message"] = message
    return PydanticCustomError(_FIELD_ERROR, "{message}", context)


def job_error_from_validation(exc: ValidationError, *, job_id: str | None = None) -> JobError:
    described = [_describe(error) for error in exc.errors(include_url=False)]
    first = described[0]
    details: dict[str, Any] = {
        "errors": described[:_MAX_REPORTED_ERRORS],
        "error_count": len(described),
    }
    if first["index"] is not None:
        details[_index_word(first["field"])] = first["index"]
    return JobError(
        code=ErrorCode.INVALID_INPUT,
        message=_sentence(first),
        field=first["field"],
        details=details,
        job_id=job_id,
    )


def _render_value(value: Any) -> str:
    """A short, JSON-flavoured rendering of untrusted input that never recurses or blows up."""
    if isinstance(value, dict):
        return f"an object with {_count(len(value), 'key')}"
    if isinstance(value, list | tuple):
        return f"an array of {_count(len(value), 'item')}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        # Python refuses to print integers beyond 4300 digits; nobody wants to read a hundred anyway.
        return str(value) if value.bit_length() <= 128 else "a very large integer"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if len(text) > _MAX_RENDERED_CHARS:
        text = text[: _MAX_RENDERED_CHARS - 3] + "..."
    # A lone surrogate (which JSON text can carry as an escape) would make the error itself unencodable.
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe(error: ErrorDetails) -> dict[str, Any]:
    context = error.get("ctx") or {}
    path = [str(part) for part in error["loc"] if isinstance(part, str)]
    path += context.get("subpath", "").split(".") if context.get("subpath") else []
    index = next((part for part in error["loc"] if isinstance(part, int)), context.get("row"))
    if error["type"] == _FIELD_ERROR:
        problem = context["message"]
    else:
        problem = _MESSAGES_BY_TYPE.get(error["type"]) or _rephrase(error["msg"])
    if error["type"] not in _NO_INPUT_ECHO:
        problem = f"{problem}, got {_render_value(error.get('input'))}"
    return {"field": ".".join(path) or None, "index": index, "type": error["type"], "problem": problem}


def _rephrase(message: str) -> str:
    for prefix, replacement in _PHRASE_REWRITES:
        if message.startswith(prefix):
            return replacement + message[len(prefix) :]
    return message


def _index_word(field: str | None) -> str:
    return "row" if field is not None and field.startswith("candles.") else "index"


def _sentence(described: dict[str, Any]) -> str:
    field = described["field"]
    position = f"{_index_word(field)} {described['index']}: " if described["index"] is not None else ""
    return f"{field or 'payload'}: {position}{described['problem']}"
