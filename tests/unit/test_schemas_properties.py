"""Property tests: whatever arrives, validate_job answers with a request or a clean JobFailed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.tseries.frequencies import to_offset

from schemas import CANDLE_COLUMNS, ErrorCode, ForecastRequest, JobFailed, Limits, job_digest, validate_job
from schemas.horizon import infer_offset, to_datetime_index

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


# --- the inferred frequency ------------------------------------------------------------------------

# Steps that pandas' inference treats specially (whole days, business hours' 17 h and 65 h gaps) and plain
# intraday ones, so that generated indexes hit every branch of it.
_STEPS = [timedelta(**{unit: n}) for unit, n in [("minutes", 5), ("minutes", 90), ("seconds", 15), ("hours", 1),
                                                  ("hours", 17), ("hours", 65), ("days", 1), ("days", 3),
                                                  ("days", 7), ("days", 31), ("microseconds", 1500)]]  # fmt: skip
_CALENDAR_FREQS = ["5min", "1h", "D", "B", "MS", "ME", "W-FRI", "bh", "QS", "YS", "15s", "1500ms", "SME", "2D"]
_ZONES = [None, UTC, timezone(timedelta(hours=5, minutes=30)), ZoneInfo("America/New_York")]


def _inferred_by_pandas(index: pd.DatetimeIndex):
    """What infer_offset answered before it read the steps itself: pandas' inference, else the most common
    step (ties to the smallest)."""
    if len(index) >= 3 and (inferred := pd.DatetimeIndex(index, freq="infer").freq) is not None:
        return inferred
    counts = (index[1:] - index[:-1]).value_counts()
    return to_offset(counts[counts == counts.max()].index.min())


@st.composite
def candle_timestamps(draw) -> list[datetime]:
    zone = draw(st.sampled_from(_ZONES))
    start = draw(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)))
    start = start.replace(tzinfo=zone) if zone is not None else start
    if draw(st.booleans()):  # a calendar range, perhaps with rows missing
        freq = draw(st.sampled_from(_CALENDAR_FREQS))
        stamps = list(pd.date_range(start, periods=draw(st.integers(2, 40)), freq=freq).to_pydatetime())
        kept = draw(st.lists(st.booleans(), min_size=len(stamps), max_size=len(stamps)))
        thinned = [stamp for stamp, keep in zip(stamps, kept, strict=True) if keep]
        stamps = thinned if len(thinned) >= 2 and draw(st.booleans()) else stamps
    else:  # steps drawn from the special ones
        steps = draw(st.lists(st.sampled_from(_STEPS), min_size=1, max_size=40))
        stamps = [start]
        for step in steps:
            stamps.append(stamps[-1] + step)
    return stamps


@THOROUGH
@given(candle_timestamps())
def test_the_inferred_frequency_is_pandas_inference_or_the_most_common_step(stamps: list[datetime]) -> None:
    index = to_datetime_index(stamps)
    expected = _inferred_by_pandas(index)
    inferred = infer_offset(index)
    assert inferred == expected and inferred.freqstr == expected.freqstr
