"""Operator-configurable size limits a worker applies to incoming jobs.

Each field is read from its KRONOS_<FIELD> variable (KRONOS_MAX_CANDLES, ...) with the other settings
(tasks/settings.py: KronosSettings.limits); this package only defines them and their defaults.
"""

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Limits(BaseModel):
    """Maxima (and the minimum lookback) enforced by `validate_job`, not by the request model itself,
    so a producer configured with other limits can still build and send a request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_candles: int = Field(4096, ge=2)
    # Kronos normalises each series by its own mean and std; over a handful of candles those statistics
    # are noise, so the default asks for a real lookback. 2 is the hard floor (a std needs two points).
    min_candles: int = Field(16, ge=2)
    max_pred_len: int = Field(512, ge=1)
    max_sample_count: int = Field(64, ge=1)
    max_payload_bytes: int = Field(2 * 1024 * 1024, ge=1)
    max_quantiles: int = Field(19, ge=0)

    @model_validator(mode="after")
    def _check_candle_range(self) -> Self:
        if self.min_candles > self.max_candles:
            raise ValueError(f"min_candles {self.min_candles} exceeds max_candles {self.max_candles}")
        return self
