"""The job contract: request parsing and rejection, limits, horizons, results, errors and JSON Schemas."""

from __future__ import annotations

import json
import pickle
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from schemas import (
    Candles,
    ErrorCode,
    ForecastRequest,
    ForecastResult,
    JobError,
    JobFailed,
    Limits,
    json_schemas,
    quantile_label,
    validate_job,
)
from tasks.settings import SettingsError, load_settings

KLINE_CSV = Path(__file__).parents[1] / "fixtures" / "data" / "kline_5min_2500.csv"
START = datetime(2024, 6, 18, 9, 30)
STEP = timedelta(minutes=5)


def make_candles(count: int = 32) -> dict[str, Any]:
    closes = [10.0 + 0.1 * (row % 7) for row in range(count)]
    opens = [closes[0], *closes[:-1]]
    return {
        "timestamps": [(START + row * STEP).isoformat() for row in range(count)],
        "open": opens,
        "high": [max(o, c) + 0.05 for o, c in zip(opens, closes, strict=True)],
        "low": [min(o, c) - 0.05 for o, c in zip(opens, closes, strict=True)],
        "close": closes,
        "volume": [1000.0 + row for row in range(count)],
        "amount": [10_000.0 + 10 * row for row in range(count)],
    }


def make_payload(**overrides: Any) -> dict[str, Any]:
    """A valid job as decoded JSON."""
    return {"series_id": "AAPL", "candles": make_candles(), "pred_len": 8, **overrides}


def rejection(payload: Any, limits: Limits | None = None) -> JobError:
    with pytest.raises(JobFailed) as caught:
        validate_job(payload, limits)
    return caught.value.error


def assert_well_formed(error: JobError) -> None:
    assert error.code is ErrorCode.INVALID_INPUT
    assert "\n" not in error.message
    assert error.message.startswith(f"{error.field or 'payload'}:")
    json.dumps(error.model_dump(mode="json"), allow_nan=False, ensure_ascii=False).encode("utf-8")


# --- valid requests ------------------------------------------------------------------------------


def test_valid_request_round_trips_through_json() -> None:
    request = ForecastRequest.model_validate(
        make_payload(job_id="job-1", sample_count=8, quantiles=[0.9, 0.1], seed=7, deadline="2030-01-01T00:00Z")
    )
    wire = json.dumps(request.model_dump(mode="json"), allow_nan=False)
    assert validate_job(wire) == request
    assert validate_job(wire.encode()) == request
    assert validate_job(json.loads(wire)) == request


def test_defaults_are_the_reference_predictor_settings() -> None:
    request = validate_job(make_payload())
    assert (request.temperature, request.top_k, request.top_p, request.sample_count) == (1.0, 0, 0.9, 1)
    assert request.model == "kronos-small"
    assert request.quantiles == [] and request.return_paths is False


def test_epoch_seconds_parse_as_utc() -> None:
    candles = make_candles()
    candles["timestamps"] = [int((START + row * STEP).replace(tzinfo=UTC).timestamp()) for row in range(32)]
    request = validate_job(make_payload(candles=candles))
    assert request.candles.timestamps[0] == START.replace(tzinfo=UTC)


def test_decoded_datetimes_are_accepted_like_their_iso_strings() -> None:
    # kombu's JSON decoder hands a worker datetime objects, not strings.
    candles = make_candles()
    candles["timestamps"] = [START + row * STEP for row in range(32)]
    assert validate_job(make_payload(candles=candles)) == validate_job(make_payload())


def test_fixture_candles_via_from_frame() -> None:
    frame = pd.read_csv(KLINE_CSV)
    request = ForecastRequest.from_frame(frame, series_id="kline", pred_len=12, sample_count=4, quantiles=[0.5])
    assert len(request.candles.timestamps) == 2500

    # The data has lunch breaks and nights; the most common step still makes the horizon 5-minute.
    future = request.resolved_future_timestamps()
    last = pd.Timestamp(frame["timestamps"].iloc[-1])
    assert list(future) == [last + k * pd.Timedelta(minutes=5) for k in range(1, 13)]

    round_tripped = validate_job(json.dumps(request.model_dump(mode="json")))
    pd.testing.assert_frame_equal(
        round_tripped.to_frame().reset_index(drop=True), frame.drop(columns="timestamps"), check_dtype=False
    )


def test_from_frame_accepts_a_datetime_index_and_optional_columns() -> None:
    frame = pd.DataFrame(make_candles()).drop(columns=["volume", "amount"])
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("timestamps")))
    request = ForecastRequest.from_frame(frame, series_id="x", pred_len=2)
    assert list(request.to_frame().columns) == ["open", "high", "low", "close"]
    assert request.candles.volume is None


def test_from_frame_needs_timestamps() -> None:
    frame = pd.DataFrame(make_candles()).drop(columns="timestamps")
    with pytest.raises(ValueError, match="timestamps"):
        ForecastRequest.from_frame(frame, series_id="x", pred_len=2)


def test_to_frame_is_indexed_by_timestamp() -> None:
    frame = validate_job(make_payload()).to_frame()
    assert isinstance(frame.index, pd.DatetimeIndex)
    assert frame.index[0] == pd.Timestamp(START)
    assert list(frame.columns) == ["open", "high", "low", "close", "volume", "amount"]


def test_job_id_is_echoed_in_the_error() -> None:
    error = rejection(make_payload(job_id="abc-123", top_p=2.0))
    assert error.job_id == "abc-123"


def test_limits_do_not_stop_building_a_request() -> None:
    request = ForecastRequest.model_validate(make_payload(pred_len=10_000, sample_count=1000))
    assert request.horizon == 10_000


# --- rejected requests ---------------------------------------------------------------------------


def _set(path: str, value: Any):
    """A payload mutation: set a dotted path (numeric parts index lists)."""

    def mutate(payload: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target: Any = payload
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if isinstance(target, list):
            target[int(leaf)] = value
        else:
            target[leaf] = value

    return mutate


def _delete(path: str):
    def mutate(payload: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = payload
        for part in parents:
            target = target[part]
        del target[leaf]

    return mutate


def _shift_timestamps(row: int, to_row: int):
    def mutate(payload: dict[str, Any]) -> None:
        stamps = payload["candles"]["timestamps"]
        stamps[row] = stamps[to_row]

    return mutate


BAD_INPUTS = [
    ("unknown top-level field", _set("surprise", 1), "surprise", "not a known field"),
    ("unknown candle column", _set("candles.vwap", [1.0]), "candles.vwap", "not a known field"),
    ("job_id with a space", _set("job_id", "a b"), "job_id", "pattern"),
    ("job_id too long", _set("job_id", "a" * 129), "job_id", "at most 128"),
    ("series_id missing", _delete("series_id"), "series_id", "is required"),
    ("series_id empty", _set("series_id", ""), "series_id", "at least 1"),
    ("series_id too long", _set("series_id", "é" * 201), "series_id", "at most 200"),
    ("series_id control char", _set("series_id", "a\x00b"), "series_id", "control characters"),
    ("series_id lone surrogate", _set("series_id", "\ud800"), "series_id", "unicode"),
    ("series_id not a string", _set("series_id", 42), "series_id", "valid string"),
    ("producer control char", _set("producer", "svc\n"), "producer", "control characters"),
    ("candles missing", _delete("candles"), "candles", "is required"),
    ("candles not an object", _set("candles", [1, 2]), "candles", "JSON object"),
    ("close missing", _delete("candles.close"), "candles.close", "is required"),
    ("timestamps empty", _set("candles.timestamps", []), "candles.timestamps", "at least 1"),
    ("timestamp garbage", _set("candles.timestamps.3", "yesterday"), "candles.timestamps", "row 3"),
    ("duplicate timestamp", _shift_timestamps(5, 4), "candles.timestamps", "row 5"),
    ("mixed naive/aware", _set("candles.timestamps.31", "2024-06-18T12:10:00+00:00"), "candles.timestamps", "mixes"),
    ("column too short", _set("candles.close", [10.0] * 31), "candles.close", "31 values"),
    ("NaN", _set("candles.open.2", float("nan")), "candles.open", "finite"),
    ("infinity", _set("candles.low.2", float("-inf")), "candles.low", "finite"),
    ("1e308", _set("candles.close.2", 1e308), "candles.close", "less than or equal"),
    ("above 1e15", _set("candles.high.2", 2e15), "candles.high", "less than or equal"),
    ("string in numbers", _set("candles.open.4", "10.0"), "candles.open", "row 4"),
    ("bool in numbers", _set("candles.open.4", True), "candles.open", "valid number"),
    ("nested junk", _set("candles.open.4", [[[[1.0]]]]), "candles.open", "got an array of 1 item"),
    ("high below body", _set("candles.high.17", 1.0), "candles.high", "row 17: high 1.0 is below max(open, close)"),
    ("low above body", _set("candles.low.9", 99.0), "candles.low", "row 9: low 99.0 is above min(open, close)"),
    ("negative volume", _set("candles.volume.3", -1.0), "candles.volume", "row 3"),
    ("negative amount", _set("candles.amount.3", -1.0), "candles.amount", "greater than or equal to 0"),
    ("amount without volume", _set("candles.volume", None), "candles.amount", "requires volume"),
    ("pred_len zero", _set("pred_len", 0), "pred_len", "greater than or equal to 1"),
    ("pred_len as string", _set("pred_len", "8"), "pred_len", "valid integer"),
    ("pred_len as float", _set("pred_len", 8.0), "pred_len", "valid integer"),
    ("no horizon", _delete("pred_len"), "pred_len", "either pred_len or future_timestamps"),
    ("bad freq", _set("freq", "fortnightly"), "freq", "offset alias"),
    ("backwards freq", _set("freq", "-5min"), "freq", "forward"),
    ("custom business freq", _set("freq", "C"), "freq", "custom business"),
    ("sub-microsecond freq", _set("freq", "500ns"), "freq", "microseconds"),
    ("horizon past year 9999", _set("freq", "1000000D"), "pred_len", "9999"),
    ("temperature zero", _set("temperature", 0), "temperature", "greater than 0"),
    ("temperature huge", _set("temperature", 101.0), "temperature", "less than or equal to 100"),
    ("temperature NaN", _set("temperature", float("nan")), "temperature", "finite"),
    ("top_k negative", _set("top_k", -1), "top_k", "greater than or equal to 0"),
    ("top_p zero", _set("top_p", 0.0), "top_p", "greater than 0"),
    ("top_p above one", _set("top_p", 1.5), "top_p", "less than or equal to 1, got 1.5"),
    ("sample_count zero", _set("sample_count", 0), "sample_count", "greater than or equal to 1"),
    ("seed negative", _set("seed", -1), "seed", "greater than or equal to 0"),
    ("seed too large", _set("seed", 2**63), "seed", "less than"),
    ("seed enormous", _set("seed", 10**50), "seed", "got a very large integer"),
    ("return_paths not bool", _set("return_paths", "yes"), "return_paths", "valid boolean"),
    ("model uppercase", _set("model", "Kronos-Small"), "model", "pattern"),
    ("model_revision spaces", _set("model_revision", "main branch"), "model_revision", "pattern"),
    ("naive deadline", _set("deadline", "2030-01-01T00:00:00"), "deadline", "timezone"),
    ("priority above 9", _set("priority", 10), "priority", "less than or equal to 9"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_names_the_field(mutate, field: str, fragment: str) -> None:
    payload = make_payload()
    mutate(payload)
    error = rejection(payload)
    assert_well_formed(error)
    assert error.field == field
    assert fragment in error.message


def test_row_index_is_in_the_details() -> None:
    payload = make_payload()
    _set("candles.high.17", 1.0)(payload)
    error = rejection(payload)
    assert error.message == "candles.high: row 17: high 1.0 is below max(open, close) 10.3"
    assert error.details["row"] == 17


def test_price_bounds_tolerate_float_rounding() -> None:
    payload = make_payload()
    body_top = max(payload["candles"]["open"][5], payload["candles"]["close"][5])
    payload["candles"]["high"][5] = body_top * (1 - 1e-12)  # e.g. a split adjustment's rounding
    assert validate_job(payload)


def test_all_errors_are_kept_json_safe_in_details() -> None:
    payload = make_payload(top_p=1.5)
    payload["candles"]["open"] = [float("nan")] * 32
    error = rejection(json.dumps(payload))
    assert error.field == "candles.open"
    assert error.details["error_count"] == 33
    assert len(error.details["errors"]) == 20
    json.dumps(error.details, allow_nan=False)


def _nested_lists(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("[1, 2]", "got an array"),
        ("null", "got null"),
        ("42", "got a number"),
        ('"job"', "got a string"),
        ("{", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ({"a": {1, 2}}, "not JSON-serializable"),
        ({"seed": 10**5000}, "not JSON-serializable"),
        ({"candles": _nested_lists(100_000)}, "nested too deeply"),
    ],
    ids=["array", "null", "number", "string", "truncated", "bad utf-8", "deep nesting", "set", "huge int", "deep dict"],
)
def test_payload_that_is_not_a_json_object(payload: Any, fragment: str) -> None:
    error = rejection(payload)
    assert_well_formed(error)
    assert error.field is None
    assert fragment in error.message


# --- horizon -------------------------------------------------------------------------------------


def test_inferred_5min_frequency_continues_the_candles() -> None:
    request = validate_job(make_payload(pred_len=3))
    last = START + 31 * STEP
    assert list(request.resolved_future_timestamps()) == [pd.Timestamp(last + k * STEP) for k in (1, 2, 3)]
    assert request.horizon == 3


def test_explicit_freq_wins_over_inference() -> None:
    request = validate_job(make_payload(pred_len=2, freq="1h"))
    last = START + 31 * STEP
    assert list(request.resolved_future_timestamps()) == [pd.Timestamp(last + timedelta(hours=k)) for k in (1, 2)]


def test_irregular_timestamps_fall_back_to_the_most_common_step() -> None:
    candles = make_candles(6)
    minutes = [0, 5, 10, 60, 65, 70]  # a gap, then 5-minute steps again
    candles["timestamps"] = [(START + timedelta(minutes=m)).isoformat() for m in minutes]
    request = validate_job(make_payload(candles=candles, pred_len=2), Limits(min_candles=2))
    assert list(request.resolved_future_timestamps()) == [pd.Timestamp(START + timedelta(minutes=m)) for m in (75, 80)]


def test_most_common_step_ties_go_to_the_smallest() -> None:
    candles = make_candles(5)
    minutes = [0, 10, 15, 25, 30]  # two 10-minute and two 5-minute steps
    candles["timestamps"] = [(START + timedelta(minutes=m)).isoformat() for m in minutes]
    request = validate_job(make_payload(candles=candles, pred_len=1), Limits(min_candles=2))
    assert request.resolved_future_timestamps()[0] == pd.Timestamp(START + timedelta(minutes=35))


def test_business_day_candles_skip_the_weekend() -> None:
    friday = datetime(2024, 6, 21)
    days = pd.bdate_range(end=friday, periods=20)
    candles = make_candles(20)
    candles["timestamps"] = [day.isoformat() for day in days]
    request = validate_job(make_payload(candles=candles, pred_len=2))
    assert list(request.resolved_future_timestamps()) == [pd.Timestamp("2024-06-24"), pd.Timestamp("2024-06-25")]


def test_frequency_of_a_single_candle_cannot_be_inferred() -> None:
    payload = make_payload(candles=make_candles(1))
    error = rejection(payload, Limits(min_candles=2))
    assert error.field == "freq"
    request = ForecastRequest.model_validate({**payload, "freq": "1D"})
    assert request.resolved_future_timestamps()[0] == pd.Timestamp(START + timedelta(days=1))


def test_aware_candles_give_aware_future_timestamps() -> None:
    candles = make_candles()
    candles["timestamps"] = [(START + row * STEP).isoformat() + "+08:00" for row in range(32)]
    future = validate_job(make_payload(candles=candles, pred_len=1)).resolved_future_timestamps()
    assert future[0] == pd.Timestamp(START + 32 * STEP, tz="Asia/Shanghai")


def _future(count: int, *, first_row: int = 32, aware: bool = False) -> list[str]:
    suffix = "+00:00" if aware else ""
    return [(START + (first_row + k) * STEP).isoformat() + suffix for k in range(count)]


def test_explicit_future_timestamps_are_used_as_given() -> None:
    future = _future(3)
    request = validate_job(make_payload(pred_len=None, future_timestamps=future))
    assert request.horizon == 3
    assert list(request.resolved_future_timestamps()) == [pd.Timestamp(stamp) for stamp in future]
    assert validate_job(make_payload(pred_len=3, future_timestamps=future)).horizon == 3


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"pred_len": 4, "future_timestamps": _future(3)}, "pred_len", "disagrees"),
        ({"pred_len": None, "future_timestamps": _future(3, first_row=31)}, "future_timestamps", "not after"),
        ({"pred_len": None, "future_timestamps": _future(3, aware=True)}, "future_timestamps", "naive"),
        ({"pred_len": None, "future_timestamps": _future(3)[::-1]}, "future_timestamps", "index 1"),
        ({"pred_len": None, "future_timestamps": []}, "future_timestamps", "at least 1"),
        ({"pred_len": None, "future_timestamps": _future(3), "freq": "5min"}, "freq", "only applies"),
    ],
    ids=["length mismatch", "not after candles", "aware vs naive", "decreasing", "empty", "freq too"],
)
def test_inconsistent_future_timestamps(overrides: dict[str, Any], field: str, fragment: str) -> None:
    error = rejection(make_payload(**overrides))
    assert_well_formed(error)
    assert (error.field, fragment in error.message) == (field, True)


# --- quantiles -----------------------------------------------------------------------------------


def test_quantiles_are_sorted_and_deduplicated() -> None:
    request = validate_job(make_payload(sample_count=16, quantiles=[0.9, 0.1, 0.5, 0.1]))
    assert request.quantiles == [0.1, 0.5, 0.9]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"sample_count": 16, "quantiles": [0.0]}, "greater than 0"),
        ({"sample_count": 16, "quantiles": [0.5, 1.0]}, "index 1: must be less than 1"),
        ({"sample_count": 16, "quantiles": ["0.5"]}, "valid number"),
        ({"quantiles": [0.5]}, "sample_count > 1"),
    ],
    ids=["zero", "one", "string", "single path"],
)
def test_bad_quantiles(overrides: dict[str, Any], fragment: str) -> None:
    error = rejection(make_payload(**overrides))
    assert (error.field, fragment in error.message) == ("quantiles", True)


def test_return_paths_with_one_sample_is_fine() -> None:
    assert validate_job(make_payload(return_paths=True)).return_paths


# --- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "limits", "field", "limit_name"),
    [
        ({"candles": make_candles(10)}, Limits(), "candles", "min_candles"),
        ({}, Limits(max_candles=20), "candles", "max_candles"),
        ({"pred_len": 600}, Limits(), "pred_len", "max_pred_len"),
        (
            {"pred_len": None, "future_timestamps": _future(5)},
            Limits(max_pred_len=4),
            "future_timestamps",
            "max_pred_len",
        ),
        ({"sample_count": 65}, Limits(), "sample_count", "max_sample_count"),
        ({"sample_count": 2, "quantiles": [0.1, 0.2, 0.3]}, Limits(max_quantiles=2), "quantiles", "max_quantiles"),
    ],
    ids=["too few candles", "too many candles", "pred_len", "future_timestamps", "sample_count", "quantiles"],
)
def test_limits_are_enforced(overrides: dict[str, Any], limits: Limits, field: str, limit_name: str) -> None:
    payload = make_payload(**overrides)
    error = rejection(payload, limits)
    assert_well_formed(error)
    assert (error.field, error.details["limit"]) == (field, limit_name)
    assert limit_name in error.message
    with pytest.raises(JobFailed):
        ForecastRequest.model_validate(payload).check_limits(limits)


def test_min_candles_can_go_down_to_two() -> None:
    assert validate_job(make_payload(candles=make_candles(2)), Limits(min_candles=2))
    with pytest.raises(ValueError):
        Limits(min_candles=1)
    with pytest.raises(ValueError):
        Limits(min_candles=100, max_candles=50)


def test_limits_from_the_environment() -> None:
    environ = {
        "KRONOS_MAX_CANDLES": "1024",
        "KRONOS_MIN_CANDLES": " 8 ",
        "KRONOS_MAX_PRED_LEN": "",  # blank counts as unset
        "KRONOS_MAX_SAMPLE_COUNT": "32",
        "KRONOS_MAX_PAYLOAD_BYTES": "1_000_000",
        "KRONOS_MAX_QUANTILES": "5",
    }
    limits = load_settings(environ).limits
    assert limits == Limits(
        max_candles=1024, min_candles=8, max_sample_count=32, max_payload_bytes=1_000_000, max_quantiles=5
    )
    assert load_settings({}).limits == Limits()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"KRONOS_MAX_PRED_LEN": "lots"}, "KRONOS_MAX_PRED_LEN"),
        ({"KRONOS_MIN_CANDLES": "1"}, "KRONOS_MIN_CANDLES"),
        ({"KRONOS_MIN_CANDLES": "100", "KRONOS_MAX_CANDLES": "50"}, "KRONOS_MIN_CANDLES / KRONOS_MAX_CANDLES"),
    ],
    ids=["not an integer", "out of range", "inconsistent"],
)
def test_bad_limits_env_names_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{re.escape(named)}:"):
        load_settings(environ)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    limits = Limits(max_payload_bytes=10_000)
    # Far too big and not even JSON: only a check that runs before parsing can give the size error.
    huge = "{" + "x" * 50_000_000
    started = time.perf_counter()
    error = rejection(huge, limits)
    assert time.perf_counter() - started < 0.5
    assert error.details["limit"] == "max_payload_bytes"
    assert error.field is None

    oversized = make_payload(candles=make_candles(200))
    del oversized["series_id"]  # would be a field error if the body were validated first
    for payload in (oversized, json.dumps(oversized), json.dumps(oversized).encode()):
        assert rejection(payload, limits).details["limit"] == "max_payload_bytes"


def test_payload_size_counts_utf8_bytes() -> None:
    payload = make_payload(series_id="株" * 200)
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    assert validate_job(payload, Limits(max_payload_bytes=size))
    assert rejection(payload, Limits(max_payload_bytes=size - 1)).details["limit"] == "max_payload_bytes"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.INVALID_INPUT, False),
        (ErrorCode.MODEL_NOT_READY, True),
        (ErrorCode.TIMEOUT, False),
        (ErrorCode.EXPIRED, False),
        (ErrorCode.RESOURCE_EXHAUSTED, True),
        (ErrorCode.RATE_LIMITED, False),
        (ErrorCode.INTERNAL, True),
    ],
)
def test_retryable_follows_the_code(code: ErrorCode, retryable: bool) -> None:
    error = JobError(code=code, message="x")
    assert error.retryable is retryable
    assert error.model_dump(mode="json")["retryable"] is retryable
    # A reader ignores the derived flag it is sent and recomputes it.
    assert JobError.model_validate({**error.model_dump(mode="json"), "retryable": not retryable}) == error


def test_job_rejected_carries_the_error() -> None:
    error = JobError(code=ErrorCode.EXPIRED, message="deadline: passed before the job started", field="deadline")
    exc = JobFailed(error)
    assert str(exc) == error.message
    assert pickle.loads(pickle.dumps(exc)).error == error


# --- results -------------------------------------------------------------------------------------


def make_result(**overrides: Any) -> ForecastResult:
    steps = [START + k * STEP for k in range(3)]
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "series_id": "AAPL",
        "model": "kronos-small",
        "model_id": "NeoQuasar/Kronos-small",
        "model_revision": "901c26c1332695a2a8f243eb2f37243a37bea320",
        "tokenizer_id": "NeoQuasar/Kronos-Tokenizer-base",
        "tokenizer_revision": None,
        "timestamps": steps,
        "forecast": {"close": [1.0, 2.0, 3.0], "open": [0.5, 1.5, 2.5]},
        "quantiles": {
            quantile_label(0.9): {"close": [1.5, 2.5, 3.5]},
            quantile_label(0.1): {"close": [0.5, 1.5, 2.5]},
        },
        "paths": {"close": [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]},
        "sample_count": 2,
        "seed": 7,
        "worker": "worker-1",
        "device": "cpu",
        "batch_size": 4,
        "timings": {"queue_wait": 0.1, "preprocess": 0.01, "inference": 0.5, "total": 0.61},
        "finished_at": datetime(2024, 6, 18, 12, tzinfo=UTC),
        **overrides,
    }
    return ForecastResult.model_validate(fields)


def test_result_to_frame() -> None:
    frame = make_result().to_frame()
    assert list(frame.columns) == ["open", "close", "close_q0.1", "close_q0.9"]
    assert frame.index[0] == pd.Timestamp(START)
    assert frame["close_q0.9"].tolist() == [1.5, 2.5, 3.5]


def test_result_round_trips_through_json() -> None:
    result = make_result(synthetic_model=True)
    wire = json.dumps(result.model_dump(mode="json"), allow_nan=False)
    assert ForecastResult.model_validate_json(wire) == result


@pytest.mark.parametrize(
    "overrides",
    [
        {"forecast": {"close": [1.0, 2.0]}},
        {"quantiles": {"1.5": {"close": [1.0, 2.0, 3.0]}}},
        {"quantiles": {"0.10": {"close": [1.0, 2.0, 3.0]}}},
        {"paths": {"close": [[1.0, 2.0, 3.0]]}},
        {"forecast": {"close": [1.0, float("nan"), 3.0]}},
        {"forecast": {"vwap": [1.0, 2.0, 3.0]}},
    ],
    ids=["short forecast", "quantile out of range", "non-canonical label", "path count", "NaN", "unknown column"],
)
def test_result_shape_is_checked(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_result(**overrides)


# --- JSON Schema ---------------------------------------------------------------------------------

_JSON_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_BOUNDS = {
    "minimum": lambda v, bound: v >= bound,
    "maximum": lambda v, bound: v <= bound,
    "exclusiveMinimum": lambda v, bound: v > bound,
    "exclusiveMaximum": lambda v, bound: v < bound,
    "minItems": lambda v, bound: len(v) >= bound,
    "maxItems": lambda v, bound: len(v) <= bound,
    "minLength": lambda v, bound: len(v) >= bound,
    "maxLength": lambda v, bound: len(v) <= bound,
}
_UNCHECKED = {"$schema", "$defs", "title", "description", "default", "format", "readOnly"}
_STRUCTURAL = {
    "$ref",
    "anyOf",
    "type",
    "enum",
    "properties",
    "additionalProperties",
    "required",
    "propertyNames",
    "items",
    "pattern",
}


def schema_violations(value: Any, schema: dict[str, Any] | bool, root: dict[str, Any], path: str = "$") -> list[str]:
    """A small JSON Schema (2020-12) checker for the keywords pydantic emits, since the jsonschema package
    is not installed. An unknown keyword fails the test rather than passing silently."""
    if schema is True:
        return []
    unknown = set(schema) - _UNCHECKED - _STRUCTURAL - set(_BOUNDS)
    assert not unknown, f"checker does not understand {unknown}"
    if "$ref" in schema:
        return schema_violations(value, root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root, path)
    found: list[str] = []
    if "anyOf" in schema and all(schema_violations(value, option, root, path) for option in schema["anyOf"]):
        found.append(f"{path}: matches no anyOf option")
    if "type" in schema and not _JSON_TYPES[schema["type"]](value):
        return [*found, f"{path}: not {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: not one of {schema['enum']}")
    for keyword, holds in _BOUNDS.items():
        applies = (
            isinstance(value, list | str)
            if "Items" in keyword or "Length" in keyword
            else (_JSON_TYPES["number"](value))
        )
        if keyword in schema and applies and not holds(value, schema[keyword]):
            found.append(f"{path}: violates {keyword} {schema[keyword]}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        found.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += schema_violations(item, schema["items"], root, f"{path}[{index}]")
    if isinstance(value, dict):
        found += [f"{path}.{name}: missing" for name in schema.get("required", []) if name not in value]
        properties, others = schema.get("properties", {}), schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                found += schema_violations(item, properties[name], root, f"{path}.{name}")
            elif others is False:
                found.append(f"{path}.{name}: not allowed")
            else:
                found += schema_violations(item, others, root, f"{path}.{name}")
            if "propertyNames" in schema:
                found += schema_violations(name, schema["propertyNames"], root, f"{path}.{name} (name)")
    return found


def test_json_schemas_describe_the_wire_formats() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"request", "result", "error"}
    json.dumps(schemas, allow_nan=False)

    request = json.loads(json.dumps(make_payload(job_id="j-1", sample_count=4, quantiles=[0.1, 0.9])))
    result = make_result().model_dump(mode="json")
    error = rejection(make_payload(top_p=1.5)).model_dump(mode="json")
    for name, document in (("request", request), ("result", result), ("error", error)):
        assert schema_violations(document, schemas[name], schemas[name]) == [], name


@pytest.mark.parametrize(
    "mutate",
    [
        _delete("series_id"),
        _delete("pred_len"),
        _set("extra", 1),
        _set("top_p", 1.5),
        _set("candles.open.0", "1.0"),
        _set("sample_count", True),
        _set("model", "Kronos"),
    ],
    ids=["no series_id", "no horizon", "extra field", "top_p", "string number", "bool count", "model name"],
)
def test_json_schema_rejects_what_the_worker_rejects(mutate) -> None:
    payload = make_payload()
    mutate(payload)
    schema = json_schemas()["request"]
    assert schema_violations(payload, schema, schema)
    rejection(payload)


# --- packaging -----------------------------------------------------------------------------------


def test_candles_model_is_public() -> None:
    candles = Candles.model_validate(make_candles(3))
    assert list(candles.columns()) == ["open", "high", "low", "close", "volume", "amount"]
