"""Calendar arithmetic: candle timestamps plus a frequency give the forecast's future timestamps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import (
    BaseOffset,
    CustomBusinessDay,
    CustomBusinessHour,
    CustomBusinessMonthBegin,
    CustomBusinessMonthEnd,
    Tick,
)

# Python datetimes (and so every timestamp on the wire) end with year 9999.
LAST_REPRESENTABLE_YEAR = 9999

# Without a holiday calendar, which an alias cannot carry, these only duplicate B/BMS/BME/bh; and pandas
# fails on them with assorted exception types near the end of the representable range.
_CUSTOM_BUSINESS_OFFSETS = (CustomBusinessDay, CustomBusinessHour, CustomBusinessMonthBegin, CustomBusinessMonthEnd)


def is_aware(timestamp: datetime) -> bool:
    return timestamp.utcoffset() is not None


def to_datetime_index(timestamps: Sequence[datetime]) -> pd.DatetimeIndex:
    """Naive stays naive. Aware timestamps may carry different UTC offsets (across a DST change, say);
    an index holds one zone, so they are expressed in the first timestamp's offset."""
    if timestamps and is_aware(timestamps[0]):
        zone = timezone(timestamps[0].utcoffset())
        return pd.DatetimeIndex(pd.to_datetime(list(timestamps), utc=True), name="timestamps").tz_convert(zone)
    return pd.DatetimeIndex(list(timestamps), name="timestamps")


def parse_freq(freq: str) -> BaseOffset:
    """A pandas offset alias ("5min", "1h", "1D", "B", "MS") as an offset; ValueError if it is not one."""
    try:
        offset = to_offset(freq)
    except (ValueError, TypeError, OverflowError):
        raise ValueError("must be a pandas offset alias such as '5min', '1h' or '1D'") from None
    if offset.n <= 0:
        raise ValueError("must move forward in time")
    if isinstance(offset, Tick) and offset.nanos % 1000:
        raise ValueError("must be a whole number of microseconds, the finest step a timestamp carries")
    if isinstance(offset, _CUSTOM_BUSINESS_OFFSETS):
        raise ValueError("must not be a custom business offset; use B, BMS, BME or bh")
    return offset


def infer_offset(index: pd.DatetimeIndex) -> BaseOffset | None:
    """The spacing of a strictly increasing index: pandas' inference when the index is perfectly regular
    (this catches calendar frequencies such as business days), else its most common step, which skips
    gaps like nights and weekends in intraday data. None for a single timestamp."""
    if len(index) < 2:
        return None
    # np.unique sorts: steps[0] is the smallest, and ties of the count go to the smallest step, so the
    # choice does not depend on row order.
    steps, counts = np.unique(np.diff(index.asi8), return_counts=True)
    most_common_step = pd.Timedelta(int(steps[np.argmax(counts)]), unit=index.unit)
    if len(index) >= 3 and _may_have_calendar_frequency(steps, index.unit):
        inferred = pd.DatetimeIndex(index, freq="infer").freq
        if inferred is not None:
            return inferred
    # Everywhere else pandas infers either nothing or, for a single intraday step, that step itself.
    return to_offset(most_common_step)


def _may_have_calendar_frequency(steps: np.ndarray, unit: str) -> bool:
    """Whether pandas' inference (pandas.tseries.frequencies._FrequencyInferer.get_freq) could return more
    than the index's one intraday step: its calendar rules apply when the smallest step is whole days, its
    business-hour rule to hourly steps with 17 h or 65 h gaps. Deciding this costs microseconds; the inference
    itself costs a third of a millisecond, most of a request's validation, on every job a worker takes."""
    tick = pd.Timedelta(1, unit=unit)
    day, hour = pd.Timedelta(days=1) // tick, pd.Timedelta(hours=1) // tick
    return bool(steps[0] % day == 0 or (steps[0] == hour and len(steps) > 1))


def horizon_end(last: pd.Timestamp, offset: BaseOffset, periods: int) -> pd.Timestamp | None:
    """The last future timestamp, computed without materialising the range (periods is not yet bounded
    by any limit when this runs); None when it falls outside what a timestamp can represent."""
    try:
        end = last + offset * periods
    except (ValueError, OverflowError):
        return None
    return end if end.year <= LAST_REPRESENTABLE_YEAR else None


def future_index(last: pd.Timestamp, offset: BaseOffset, periods: int) -> pd.DatetimeIndex:
    # Start from last + offset rather than from last: anchored offsets (MS, W-FRI, B) roll a start that is
    # off-anchor forward, which would silently drop or duplicate the first step.
    return pd.date_range(start=last + offset, periods=periods, freq=offset, name="timestamps")
