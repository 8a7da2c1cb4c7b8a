"""Field types shared across the contract: finite numbers and single-line text."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, AllowInfNan, Field, Strict

# Kronos casts inputs to float32 (max ~3.4e38) before normalising; the sum of squares behind the std
# overflows first. 1e15 squared, times a few thousand rows, stays far below that.
MAX_ABS_VALUE = 1e15

# Strict: a JSON number only. Booleans and numeric strings are producer bugs, not numbers.
FiniteNumber = Annotated[float, Strict(), AllowInfNan(False)]
CandleValue = Annotated[FiniteNumber, Field(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
NonNegativeCandleValue = Annotated[FiniteNumber, Field(ge=0, le=MAX_ABS_VALUE)]

_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _reject_control_characters(value: str) -> str:
    found = _CONTROL_CHARACTER.search(value)
    if found:
        raise ValueError(
            f"must not contain control characters (U+{ord(found.group()):04X} at position {found.start()})"
        )
    return value


# Free text for logs and dashboards: any script, but nothing that breaks a log line or a terminal.
DisplayText = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"}),
    AfterValidator(_reject_control_characters),
]
