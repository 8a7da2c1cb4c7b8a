"""The forecast job a producer enqueues: lookback candles, the horizon, and sampling settings."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

import pandas as pd
from pandas.tseries.offsets import BaseOffset
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from schemas.candles import Candles, check_time_order
from schemas.error_translation import field_error
from schemas.errors import JobFailed
from schemas.fields import DisplayText, FiniteNumber
from schemas.horizon import (
    LAST_REPRESENTABLE_YEAR,
    future_index,
    horizon_end,
    infer_offset,
    is_aware,
    parse_freq,
    to_datetime_index,
)
from schemas.limits import Limits

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
MODEL_NAME_PATTERN = r"^[a-z0-9._-]+$"
REVISION_PATTERN = r"^[A-Za-z0-9._/-]+$"

Quantile = Annotated[FiniteNumber, Field(gt=0, lt=1)]

# pydantic cannot express "one of two fields" from the annotations; say it in the schema so non-Python
# producers see it too.
_HORIZON_SCHEMA = {"anyOf": [{"required": ["pred_len"]}, {"required": ["future_timestamps"]}]}


class ForecastRequest(BaseModel):
    """One series to forecast. Give the horizon as `pred_len` (with `freq`, or a frequency inferred from
    the candles) or as explicit `future_timestamps`. Size limits are not checked here: see `check_limits`."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), json_schema_extra=_HORIZON_SCHEMA)

    job_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=JOB_ID_PATTERN, description="Optional caller-chosen id."
    )
    series_id: DisplayText
    producer: DisplayText | None = Field(None, description="Sending service; informational only.")
    candles: Candles

    pred_len: StrictInt | None = Field(None, ge=1, description="Steps to forecast.")
    freq: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="pandas offset alias such as '5min', '1h', '1D'; inferred from the candles when absent.",
    )
    future_timestamps: list[datetime] | None = Field(
        None, min_length=1, description="Explicit horizon: strictly increasing, after the last candle."
    )

    # Defaults are the reference Kronos predictor's.
    temperature: FiniteNumber = Field(1.0, gt=0, le=100)
    top_k: StrictInt = Field(0, ge=0, description="0 disables top-k filtering.")
    top_p: FiniteNumber = Field(0.9, gt=0, le=1)
    sample_count: StrictInt = Field(1, ge=1, description="Sampled paths averaged into the forecast.")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    quantiles: list[Quantile] = Field(
        default_factory=list, description="Per-step quantiles over the sampled paths; needs sample_count > 1."
    )
    return_paths: StrictBool = False

    model: str = Field("kronos-small", min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)
    model_revision: str | None = Field(None, min_length=1, max_length=200, pattern=REVISION_PATTERN)
    deadline: AwareDatetime | None = Field(None, description="A job not started by then is not run.")
    priority: StrictInt | None = Field(
        None, ge=0, le=9, description="1 is served first, 9 last; 5 is the default, and 0 the same."
    )

    @field_validator("freq")
    @classmethod
    def _freq_is_an_offset_alias(cls, freq: str | None) -> str | None:
        if freq is not None:
            parse_freq(freq)
        return freq

    @field_validator("quantiles")
    @classmethod
    def _sorted_unique(cls, quantiles: list[float]) -> list[float]:
        return sorted(set(quantiles))

    @model_validator(mode="after")
    def _check_horizon_and_sampling(self) -> Self:
        if self.future_timestamps is None:
            self._check_pred_len_horizon()
        else:
            self._check_explicit_horizon(self.future_timestamps)
        if self.quantiles and self.sample_count == 1:
            raise field_error("quantiles", "quantiles need sample_count > 1 (a single path has no spread)")
        return self

    def _check_pred_len_horizon(self) -> None:
        if self.pred_len is None:
            raise field_error("pred_len", "either pred_len or future_timestamps is required")
        index = self._candle_index()
        offset, last = self._future_offset(index), index[-1]
        if horizon_end(last, offset, self.pred_len) is None:
            raise field_error(
                "pred_len",
                f"{self.pred_len} steps of {offset.freqstr} after {last.isoformat()} "
                f"run past the year {LAST_REPRESENTABLE_YEAR}",
            )

    def _check_explicit_horizon(self, future: list[datetime]) -> None:
        if self.freq is not None:
            raise field_error("freq", "freq only applies with pred_len; future_timestamps already fix the horizon")
        if self.pred_len is not None and self.pred_len != len(future):
            raise field_error("pred_len", f"pred_len {self.pred_len} disagrees with {len(future)} future_timestamps")
        check_time_order(future, "future_timestamps")
        last = self.candles.timestamps[-1]
        if is_aware(future[0]) != is_aware(last):
            kinds = ("naive", "timezone-aware")
            raise field_error(
                "future_timestamps",
                f"are {kinds[is_aware(future[0])]} but the candle timestamps are {kinds[is_aware(last)]}",
            )
        if future[0] <= last:
            raise field_error(
                "future_timestamps",
                f"{future[0].isoformat()} is not after the last candle {last.isoformat()}",
                row=0,
            )

    def _candle_index(self) -> pd.DatetimeIndex:
        return to_datetime_index(self.candles.timestamps)

    def _future_offset(self, index: pd.DatetimeIndex) -> BaseOffset:
        if self.freq is not None:
            return parse_freq(self.freq)
        offset = infer_offset(index)
        if offset is None:
            raise field_error("freq", "cannot be inferred from a single candle; give freq, e.g. '5min'")
        return offset

    @property
    def horizon(self) -> int:
        """The number of steps to forecast, however the horizon was given."""
        return self.pred_len if self.future_timestamps is None else len(self.future_timestamps)

    def resolved_future_timestamps(self) -> pd.DatetimeIndex:
        if self.future_timestamps is not None:
            return to_datetime_index(self.future_timestamps)
        index = self._candle_index()
        return future_index(index[-1], self._future_offset(index), self.pred_len)

    def check_limits(self, limits: Limits) -> None:
        """Raise `JobFailed` (INVALID_INPUT) for the first limit this request exceeds."""
        candle_count = len(self.candles.timestamps)
        if candle_count < limits.min_candles:
            raise self._over_limit("candles", f"{candle_count} candles are fewer than", "min_candles", limits)
        if candle_count > limits.max_candles:
            raise self._over_limit("candles", f"{candle_count} candles are more than", "max_candles", limits)
        if self.horizon > limits.max_pred_len:
            horizon_field = "pred_len" if self.future_timestamps is None else "future_timestamps"
            raise self._over_limit(
                horizon_field, f"a horizon of {self.horizon} steps is more than", "max_pred_len", limits
            )
        if self.sample_count > limits.max_sample_count:
            raise self._over_limit("sample_count", f"{self.sample_count} is more than", "max_sample_count", limits)
        if len(self.quantiles) > limits.max_quantiles:
            raise self._over_limit(
                "quantiles", f"{len(self.quantiles)} quantiles are more than", "max_quantiles", limits
            )

    def _over_limit(self, field: str, comparison: str, limit_name: str, limits: Limits) -> JobFailed:
        limit = getattr(limits, limit_name)
        return JobFailed.invalid_input(
            field,
            f"{comparison} the {limit_name} limit of {limit}",
            job_id=self.job_id,
            details={"limit": limit_name, "limit_value": limit},
        )

    def to_frame(self) -> pd.DataFrame:
        """The candles as a DataFrame indexed by timestamp, with only the columns present."""
        return self.candles.to_frame()

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, series_id: str, **options: Any) -> ForecastRequest:
        """A request from a frame with a DatetimeIndex or a timestamps/timestamp/date column; `options`
        are the other request fields (pred_len, sample_count, ...)."""
        return cls.model_validate(dict(series_id=series_id, candles=Candles.from_frame(frame), **options))
