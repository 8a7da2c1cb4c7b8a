"""Bad forecast inputs give an InvalidInputError naming the field; good ones give well-formed results."""

import dataclasses

import kronos_cases as kc
import numpy as np
import pandas as pd
import pytest

from model import InvalidInputError, SeriesInput
from model.engine import MAX_SEED
from model.preprocess import COLUMNS, PRICE_COLUMNS, STD_EPS

ENGINE = kc.engine(max_context=64)
LOOKBACK, PRED_LEN = 32, 4


def good(**sampling) -> SeriesInput:
    return kc.window(100, LOOKBACK, PRED_LEN, **sampling)


def with_candles(edit) -> SeriesInput:
    """The good series with its candles replaced by `edit(candles)`."""
    series = good()
    return dataclasses.replace(series, candles=edit(series.candles))


def set_cell(column: str, value):
    def edit(candles: pd.DataFrame) -> pd.DataFrame:
        edited = candles.astype({column: object})
        edited.loc[5, column] = value
        return edited

    return edit


def drop(*columns: str):
    return lambda candles: candles.drop(columns=list(columns))


def with_timestamps(values) -> SeriesInput:
    return dataclasses.replace(good(), timestamps=values)


def with_future(values) -> SeriesInput:
    return dataclasses.replace(good(), future_timestamps=values)


def past_stamps() -> pd.DatetimeIndex:
    return pd.DatetimeIndex(good().timestamps)


def future_stamps() -> pd.DatetimeIndex:
    return pd.DatetimeIndex(good().future_timestamps)


def swapped(index: pd.DatetimeIndex, i: int) -> list:
    values = list(index)
    values[i], values[i + 1] = values[i + 1], values[i]
    return values


def duplicated(index: pd.DatetimeIndex, i: int) -> list:
    values = list(index)
    values[i + 1] = values[i]
    return values


def short_lookback(rows: int) -> SeriesInput:
    series = good()
    return dataclasses.replace(series, candles=series.candles.iloc[:rows], timestamps=series.timestamps.iloc[:rows])


BAD_INPUTS = {
    "empty lookback": (lambda: short_lookback(0), "candles"),
    "lookback below min_lookback": (lambda: short_lookback(ENGINE.min_lookback - 1), "candles"),
    **{f"missing {c}": (lambda c=c: with_candles(drop(c)), "candles") for c in PRICE_COLUMNS},
    "amount without volume": (lambda: with_candles(drop("volume")), "candles.amount"),
    **{
        f"{name} in {c}": (lambda c=c, v=v: with_candles(set_cell(c, v)), f"candles.{c}")
        for c in COLUMNS
        for name, v in [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("None", None)]
    },
    "text in close": (lambda: with_candles(set_cell("close", "n/a")), "candles"),
    "timestamp in volume": (lambda: with_candles(set_cell("volume", pd.Timestamp("2024-01-01"))), "candles"),
    "one timestamp short": (lambda: with_timestamps(past_stamps()[1:]), "timestamps"),
    "one timestamp too many": (
        lambda: with_timestamps(past_stamps().insert(0, past_stamps()[0] - pd.Timedelta("5min"))),
        "timestamps",
    ),
    "lookback timestamps out of order": (lambda: with_timestamps(swapped(past_stamps(), 10)), "timestamps"),
    "duplicate lookback timestamp": (lambda: with_timestamps(duplicated(past_stamps(), 10)), "timestamps"),
    "future timestamps out of order": (lambda: with_future(swapped(future_stamps(), 1)), "future_timestamps"),
    "duplicate future timestamp": (lambda: with_future(duplicated(future_stamps(), 1)), "future_timestamps"),
    "future starts before the last candle": (
        lambda: with_future(future_stamps() - pd.Timedelta("1h")),
        "future_timestamps",
    ),
    "future starts at the last candle": (
        lambda: with_future(future_stamps() - (future_stamps()[0] - past_stamps()[-1])),
        "future_timestamps",
    ),
    "naive lookback, aware future": (lambda: with_future(future_stamps().tz_localize("UTC")), "future_timestamps"),
    "aware lookback, naive future": (lambda: with_timestamps(past_stamps().tz_localize("UTC")), "future_timestamps"),
    "naive and aware in one lookback": (
        lambda: with_timestamps([*past_stamps()[:-1], past_stamps()[-1].tz_localize("UTC")]),
        "timestamps",
    ),
    "unparseable lookback timestamp": (
        lambda: with_timestamps([*past_stamps().astype(str)[:-1], "not a time"]),
        "timestamps",
    ),
    "unparseable future timestamp": (lambda: with_future(["2024-06-18 14:00", "soon"]), "future_timestamps"),
    "missing future timestamp": (lambda: with_future([future_stamps()[0], None]), "future_timestamps"),
    "numbers as timestamps": (lambda: with_timestamps(range(LOOKBACK)), "timestamps"),
    "no timestamps and no DatetimeIndex": (lambda: with_timestamps(None), "timestamps"),
    "pred_len 0": (lambda: with_future([]), "future_timestamps"),
    "pred_len above max_pred_len": (
        lambda: with_future(pd.date_range(future_stamps()[0], periods=ENGINE.max_pred_len + 1, freq="5min")),
        "future_timestamps",
    ),
    **{
        f"temperature {v!r}": (lambda v=v: good(temperature=v), "temperature") for v in [0.0, -0.5, np.nan, np.inf, "1"]
    },
    **{f"top_p {v!r}": (lambda v=v: good(top_p=v), "top_p") for v in [0.0, 1.01, -0.1, np.nan]},
    **{f"top_k {v!r}": (lambda v=v: good(top_k=v), "top_k") for v in [-1, 2.5, 3.0, "5"]},
    **{f"sample_count {v!r}": (lambda v=v: good(sample_count=v), "sample_count") for v in [0, -2, 2.0]},
    **{f"seed {v!r}": (lambda v=v: good(seed=v), "seed") for v in [-1, MAX_SEED, 1.5]},
    **{
        f"quantile {v!r}": (lambda v=v: good(sample_count=4, quantiles=[0.5, v]), "quantiles")
        for v in [0.0, 1.0, -0.1, 1.5, np.nan]
    },
    "quantiles with one sample": (lambda: good(sample_count=1, quantiles=[0.1, 0.9]), "quantiles"),
}


@pytest.mark.parametrize(("make_bad", "field"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_names_its_field_and_series(make_bad, field):
    with pytest.raises(InvalidInputError) as raised:
        ENGINE.forecast([good(), make_bad(), good()])
    assert raised.value.field == field, str(raised.value)
    assert raised.value.series == 1
    assert str(raised.value).startswith(f"series 1: {field}: ")


def test_missing_price_column_is_named():
    with pytest.raises(InvalidInputError, match="missing price column"):
        ENGINE.prepare(with_candles(drop("high", "low")))


def test_nan_reports_row():
    with pytest.raises(InvalidInputError, match="row 5 is nan") as raised:
        ENGINE.prepare(with_candles(set_cell("low", np.nan)))
    assert raised.value.series is None


def test_error_names_the_series_index_in_a_batch():
    bad = good(top_p=0.0)
    for position in range(4):
        batch = [good() for _ in range(3)]
        batch.insert(position, bad)
        with pytest.raises(InvalidInputError) as raised:
            ENGINE.forecast(batch)
        assert (raised.value.field, raised.value.series) == ("top_p", position)


def test_smallest_lookback_and_largest_horizon_are_accepted():
    series = short_lookback(ENGINE.min_lookback)
    longest = min(ENGINE.max_pred_len, ENGINE.max_context)
    future = pd.date_range(future_stamps()[0], periods=longest, freq="5min")
    prepared = ENGINE.prepare(dataclasses.replace(series, future_timestamps=future))
    assert prepared.x.shape == (ENGINE.min_lookback, 6)
    assert prepared.pred_len == longest
    assert len(ENGINE.forecast_prepared([prepared])[0].mean) == longest


def test_a_horizon_beyond_the_context_is_refused_up_front():
    """The forecast is read back from one context window: a longer horizon once ran every step and then failed
    the whole batch in pandas."""
    series = short_lookback(ENGINE.min_lookback)
    future = pd.date_range(future_stamps()[0], periods=ENGINE.max_context + 1, freq="5min")
    with pytest.raises(InvalidInputError, match="context"):
        ENGINE.prepare(dataclasses.replace(series, future_timestamps=future))


def test_forecast_of_no_series_is_empty():
    assert ENGINE.forecast([]) == []


def test_datetime_index_stands_in_for_timestamps():
    explicit = good(top_k=1)
    indexed = dataclasses.replace(
        explicit, candles=explicit.candles.set_axis(pd.DatetimeIndex(explicit.timestamps)), timestamps=None
    )
    by_index, by_argument = ENGINE.forecast([indexed, explicit])
    np.testing.assert_array_equal(by_index.s1, by_argument.s1)
    np.testing.assert_array_equal(by_index.s2, by_argument.s2)
    pd.testing.assert_frame_equal(by_index.mean, by_argument.mean)


def test_timezone_aware_timestamps_are_accepted():
    series = good(top_k=1)
    aware = dataclasses.replace(
        series, timestamps=past_stamps().tz_localize("UTC"), future_timestamps=future_stamps().tz_localize("UTC")
    )
    (naive_result, aware_result) = ENGINE.forecast([series, aware])
    np.testing.assert_array_equal(naive_result.s1, aware_result.s1)
    assert aware_result.mean.index.equals(future_stamps().tz_localize("UTC"))


@pytest.fixture(scope="module")
def sampled():
    series = good(sample_count=8, quantiles=[0.9, 0.1, 0.5], return_paths=True, seed=11, top_p=0.95)
    return series, ENGINE.forecast([series])[0]


def test_result_shapes_and_labels(sampled):
    series, result = sampled
    assert result.mean.shape == (PRED_LEN, 6)
    assert list(result.mean.columns) == list(COLUMNS)
    assert result.mean.index.equals(future_stamps())
    assert result.paths.shape == (series.sample_count, PRED_LEN, 6)
    assert result.s1.shape == result.s2.shape == (series.sample_count, PRED_LEN)
    assert sorted(result.quantiles) == [0.1, 0.5, 0.9]
    for frame in result.quantiles.values():
        assert frame.index.equals(result.mean.index)
        assert list(frame.columns) == list(COLUMNS)


def test_quantiles_are_ordered_and_come_from_the_paths(sampled):
    _, result = sampled
    q10, q50, q90 = (result.quantiles[q].to_numpy() for q in (0.1, 0.5, 0.9))
    assert (q10 <= q50).all() and (q50 <= q90).all()
    np.testing.assert_allclose(q50, np.median(result.paths, axis=0), rtol=1e-6)
    assert (q90 > q10).any(), "eight sampled paths at T=1 should spread"


def test_mean_is_the_mean_of_normalized_paths(sampled):
    """The reference averages the sample paths in model units, then undoes the normalization."""
    series, result = sampled
    prepared = ENGINE.prepare(series)
    normalized_paths = (result.paths - prepared.mean) / (prepared.std + STD_EPS)
    expected = normalized_paths.mean(axis=0) * (prepared.std + STD_EPS) + prepared.mean
    np.testing.assert_allclose(result.mean.to_numpy(), expected, rtol=1e-5)


def test_paths_are_left_out_unless_asked():
    result = ENGINE.forecast([good(sample_count=3, quantiles=[0.5], seed=3)])[0]
    assert result.paths is None
    assert list(result.quantiles) == [0.5]


def test_drawn_seed_is_reported_and_reproduces_the_forecast():
    first = ENGINE.forecast([good(sample_count=2, seed=None)])[0]
    assert isinstance(first.seed, int) and 0 <= first.seed < MAX_SEED
    again = ENGINE.forecast([good(sample_count=2, seed=first.seed)])[0]
    np.testing.assert_array_equal(again.s1, first.s1)
    np.testing.assert_array_equal(again.s2, first.s2)
    pd.testing.assert_frame_equal(again.mean, first.mean)
    other = ENGINE.forecast([good(sample_count=2, seed=None)])[0]
    assert other.seed != first.seed
