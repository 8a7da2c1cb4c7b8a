"""Property tests: whatever arrives, validate_job answers with a request or a clean JobFailed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import CANDLE_COLUMNS, ErrorCode, ForecastRequest, JobFailed, Limits, job_digest, validate_job

REQUEST_FIELDS = sorted(ForecastRequest.model_fields)
LIMITS = Limits(min_candles=2)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # includes NaN, +-inf, 1e308, -0.0
    | st.text(max_size=20)
    | st.sampled_from(["2024-01-01T00:00:00", "2024-01-01T00:00:00+05:30", "5min", "NaN", "1e308", ""])
)
json_junk = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(REQUEST_FIELDS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)

# Per test, not a loaded profile: a profile would change every other module's property tests too.
THOROUGH = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_payload(count: int = 20) -> dict[str, Any]:
    start = datetime(2024, 1, 2, 9, 30)
    closes = [100.0 + row for row in range(count)]
    return {
        "series_id": "s",
        "pred_len": 4,
        "candles": {
            "timestamps": [(start + row * timedelta(minutes=5)).isoformat() for row in range(count)],
            "open": closes,
            "high": [c + 1 for c in closes],
            "low": [c - 1 for c in closes],
            "close": closes,
            "volume": [1.0] * count,
            "amount": [2.0] * count,
        },
    }


def validate_or_reject(payload: Any) -> ForecastRequest | None:
    """Run validate_job; on rejection check the error is one JSON-safe sentence naming its field."""
    try:
        return validate_job(payload, LIMITS)
    except JobFailed as exc:
        error = exc.error
        assert error.code is ErrorCode.INVALID_INPUT
        assert "\n" not in error.message
        assert error.message.startswith(f"{error.field or 'payload'}:")
        json.dumps(error.model_dump(mode="json"), allow_nan=False, ensure_ascii=False).encode("utf-8")
        return None


@THOROUGH
@given(json_junk)
def test_arbitrary_junk_is_rejected_cleanly(junk: Any) -> None:
    validate_or_reject(junk)
    validate_or_reject(json.dumps(junk))


@THOROUGH
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_text_is_rejected_cleanly(raw: str | bytes) -> None:
    validate_or_reject(raw)


@THOROUGH
@given(st.sampled_from(REQUEST_FIELDS), json_junk)
def test_one_junk_field_in_a_valid_job(field: str, junk: Any) -> None:
    payload = valid_payload()
    payload[field] = junk
    validate_or_reject(payload)


@THOROUGH
@given(st.sampled_from(["timestamps", *CANDLE_COLUMNS]), st.integers(0, 19), json_junk)
def test_one_junk_candle_value(column: str, row: int, junk: Any) -> None:
    payload = valid_payload()
    payload["candles"][column][row] = junk
    accepted = validate_or_reject(json.dumps(payload)) is not None
    if accepted and column != "timestamps":
        assert isinstance(junk, int | float) and not isinstance(junk, bool)


@THOROUGH
@given(
    st.lists(
        st.tuples(
            st.floats(-1e6, 1e6),  # open
            st.floats(-1e6, 1e6),  # close
            st.floats(0, 1e3),  # how far high rises above the body
            st.floats(0, 1e3),  # how far low falls below it
        ),
        min_size=2,
        max_size=40,
    ),
    st.integers(1, 60),
    st.sampled_from(["1s", "5min", "1h", "1D"]),
    st.integers(1, 16),
)
def test_generated_valid_jobs_are_accepted_and_round_trip(
    candles: list[tuple[float, float, float, float]], step_minutes: int, freq: str, pred_len: int
) -> None:
    start = datetime(2024, 1, 2)
    payload = {
        "series_id": "generated",
        "pred_len": pred_len,
        "freq": freq,
        "candles": {
            "timestamps": [(start + row * timedelta(minutes=step_minutes)).isoformat() for row in range(len(candles))],
            "open": [o for o, _, _, _ in candles],
            "high": [max(o, c) + up for o, c, up, _ in candles],
            "low": [min(o, c) - down for o, c, _, down in candles],
            "close": [c for _, c, _, _ in candles],
        },
    }
    request = validate_job(json.dumps(payload), LIMITS)
    assert len(request.resolved_future_timestamps()) == pred_len
    assert validate_job(json.dumps(request.model_dump(mode="json")), LIMITS) == request
    # the client's record and the worker's claim digest the same request alike: as the client built it, as it
    # arrives (the client's wire form, its job id added), with every default written out or left out
    sent = request.model_copy(update={"job_id": "reports:1", "priority": 3}).model_dump(mode="json", exclude_none=True)
    arrived = validate_job(json.dumps(sent), LIMITS)
    assert job_digest(arrived) == job_digest(request) == job_digest(ForecastRequest.model_validate(payload))
    assert job_digest(request.model_copy(update={"seed": 7})) != job_digest(request.model_copy(update={"seed": 8}))
