"""The lookback window: columnar OHLCV(A) candles, checked for shape, order and sanity."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.error_translation import field_error
from schemas.fields import CandleValue, NonNegativeCandleValue
from schemas.horizon import is_aware, to_datetime_index

Column = Literal["open", "high", "low", "close", "volume", "amount"]
CANDLE_COLUMNS: tuple[Column, ...] = ("open", "high", "low", "close", "volume", "amount")
TIMESTAMP_COLUMNS = ("timestamps", "timestamp", "date")

# Prices that went through float arithmetic upstream (split adjustment, currency conversion) can miss
# their bound by an ulp; that is rounding, not a malformed candle.
_PRICE_RTOL = 1e-9


class Candles(BaseModel):
    """One value per timestamp in every column; volume and amount are optional (amount needs volume)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timestamps: list[datetime] = Field(
        min_length=1,
        description="Strictly increasing ISO-8601 date-times (epoch seconds also accepted), "
        "all naive or all timezone-aware.",
    )
    open: list[CandleValue]
    high: list[CandleValue]
    low: list[CandleValue]
    close: list[CandleValue]
    volume: list[NonNegativeCandleValue] | None = None
    amount: list[NonNegativeCandleValue] | None = Field(None, description="Turnover; requires volume.")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.amount is not None and self.volume is None:
            raise field_error("amount", "requires volume")
        for column, values in self.columns().items():
            if len(values) != len(self.timestamps):
                raise field_error(column, f"has {len(values)} values but there are {len(self.timestamps)} timestamps")
        check_time_order(self.timestamps, "timestamps")
        self._check_price_bounds()
        return self

    def _check_price_bounds(self) -> None:
        open_, high, low, close = (np.asarray(values) for values in (self.open, self.high, self.low, self.close))
        body_top, body_bottom = np.maximum(open_, close), np.minimum(open_, close)
        slack = _PRICE_RTOL * np.maximum(np.abs(body_top), np.abs(body_bottom))
        row = _first_true(high < body_top - slack)
        if row is not None:
            problem = f"high {float(high[row])!r} is below max(open, close) {float(body_top[row])!r}"
            raise field_error("high", problem, row=row)
        row = _first_true(low > body_bottom + slack)
        if row is not None:
            problem = f"low {float(low[row])!r} is above min(open, close) {float(body_bottom[row])!r}"
            raise field_error("low", problem, row=row)

    def columns(self) -> dict[Column, list[float]]:
        """The columns present, in canonical order."""
        present = {column: getattr(self, column) for column in CANDLE_COLUMNS}
        return {column: values for column, values in present.items() if values is not None}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns(), index=to_datetime_index(self.timestamps))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Candles:
        """From a frame with a DatetimeIndex or a timestamps/timestamp/date column, plus the OHLCV(A)
        columns it has; other columns are ignored."""
        index = _timestamp_index(frame)
        columns = {
            column: frame[column].to_numpy(dtype=float).tolist() for column in CANDLE_COLUMNS if column in frame.columns
        }
        return cls(timestamps=index.to_pydatetime().tolist(), **columns)


def check_time_order(timestamps: Sequence[datetime], subpath: str) -> None:
    """All naive or all aware (the two cannot be ordered), then strictly increasing."""
    aware = is_aware(timestamps[0])
    for row, timestamp in enumerate(timestamps):
        if is_aware(timestamp) != aware:
            raise field_error(subpath, "mixes naive and timezone-aware timestamps", row=row)
    for row in range(1, len(timestamps)):
        if timestamps[row] <= timestamps[row - 1]:
            raise field_error(
                subpath,
                f"{timestamps[row].isoformat()} is not after {timestamps[row - 1].isoformat()} "
                "(timestamps must be strictly increasing)",
                row=row,
            )


def _first_true(mask: np.ndarray) -> int | None:
    return int(np.flatnonzero(mask)[0]) if mask.any() else None


def _timestamp_index(frame: pd.DataFrame) -> pd.DatetimeIndex:
    if isinstance(frame.index, pd.DatetimeIndex):
        return frame.index
    for column in TIMESTAMP_COLUMNS:
        if column in frame.columns:
            return pd.DatetimeIndex(pd.to_datetime(frame[column]))
    raise ValueError(f"frame needs a DatetimeIndex or one of the columns {', '.join(TIMESTAMP_COLUMNS)}")
