"""Operator-configurable size limits a worker applies to incoming jobs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENV_VARIABLES = {
    "max_candles": "KRONOS_MAX_CANDLES",
    "min_candles": "KRONOS_MIN_CANDLES",
    "max_pred_len": "KRONOS_MAX_PRED_LEN",
    "max_sample_count": "KRONOS_MAX_SAMPLE_COUNT",
    "max_payload_bytes": "KRONOS_MAX_PAYLOAD_BYTES",
    "max_quantiles": "KRONOS_MAX_QUANTILES",
}


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Defaults overridden by KRONOS_MAX_* / KRONOS_MIN_CANDLES; a blank variable counts as unset."""
        values: dict[str, int] = {}
        for name, variable in ENV_VARIABLES.items():
            raw = environ.get(variable, "").strip()
            if not raw:
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{variable}: expected an integer, got {raw!r}") from None
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            # A cross-field error has no field of its own; blame every variable it involves.
            culprits = [ENV_VARIABLES[str(part)] for part in first["loc"]] or [
                ENV_VARIABLES["min_candles"],
                ENV_VARIABLES["max_candles"],
            ]
            problem = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"{' / '.join(culprits)}: {problem}") from None
