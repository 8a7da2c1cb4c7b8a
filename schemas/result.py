"""What a worker hands back for a finished job: the forecast plus enough provenance to trust it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self

import pandas as pd
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, model_validator

from schemas.candles import CANDLE_COLUMNS, Column
from schemas.fields import FiniteNumber
from schemas.horizon import to_datetime_index

Seconds = Annotated[FiniteNumber, Field(ge=0)]


def quantile_label(quantile: float) -> str:
    """The key of a quantile in `ForecastResult.quantiles` and the suffix of its frame columns
    (0.1 -> "0.1" -> "close_q0.1"). repr round-trips, so distinct quantiles never share a label."""
    return repr(float(quantile))


class Timings(BaseModel):
    """Wall-clock seconds of one job's path. queue_wait (enqueue to start) spans two hosts' clocks, so the
    worker clamps it at 0, and it is null when the producer sent no `kronos_sent_at` header; total then
    counts from the start in the worker."""

    model_config = ConfigDict(frozen=True)

    queue_wait: Seconds | None = Field(description="From enqueue to the worker starting the job.")
    preprocess: Seconds = Field(description="Validation and normalization in the worker.")
    batch_wait: Seconds = Field(0.0, description="Waiting for an engine batch to form and start.")
    inference: Seconds = Field(description="The engine call this job's batch ran in.")
    total: Seconds = Field(description="From enqueue (or start) to the result being ready.")


class ForecastResult(BaseModel):
    """Unknown fields are ignored so producers on an older release still read newer workers' results."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    job_id: str
    series_id: str
    precision: str = Field(
        "float32", description="The predictor's precision: float32 (exact), or the opt-in bfloat16/float16/int8."
    )
    request_digest: str | None = Field(
        None, description="schemas.job_digest of the request this answers: a job id names one request."
    )
    model: str = Field(description="Model name as requested, e.g. 'kronos-small'.")
    model_id: str = Field(description="Where the weights came from: a hub repo id or a path.")
    model_revision: str | None = None
    tokenizer_id: str
    tokenizer_revision: str | None = None
    timestamps: list[datetime] = Field(min_length=1, description="The forecast's future timestamps.")
    forecast: dict[Column, list[FiniteNumber]] = Field(description="Column -> mean over sampled paths, per step.")
    quantiles: dict[str, dict[Column, list[FiniteNumber]]] = Field(
        default_factory=dict, description="Quantile label (e.g. '0.1') -> column -> values per step."
    )
    paths: dict[Column, list[list[FiniteNumber]]] | None = Field(
        None, description="Column -> sample -> values per step; only when return_paths was asked."
    )
    sample_count: StrictInt = Field(ge=1)
    seed: StrictInt | None = None
    worker: str
    device: str
    batch_size: StrictInt = Field(ge=1, description="How many jobs shared the engine batch.")
    timings: Timings
    finished_at: AwareDatetime
    synthetic_model: bool = Field(
        False, description="True when the weights are an untrained demo checkpoint: the numbers mean nothing."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        steps = len(self.timestamps)
        series = {f"forecast.{column}": values for column, values in self.forecast.items()}
        for label, columns in self.quantiles.items():
            quantile = _parse_label(label)
            # Canonical labels let a reader look a quantile up with quantile_label(q).
            if not 0 < quantile < 1 or label != quantile_label(quantile):
                raise ValueError(f"quantiles: label {label!r} is not quantile_label() of a quantile in (0, 1)")
            series.update({f"quantiles.{label}.{column}": values for column, values in columns.items()})
        for column, column_paths in (self.paths or {}).items():
            if len(column_paths) != self.sample_count:
                raise ValueError(f"paths.{column}: {len(column_paths)} paths for sample_count {self.sample_count}")
            series.update({f"paths.{column}.{sample}": path for sample, path in enumerate(column_paths)})
        for name, values in series.items():
            if len(values) != steps:
                raise ValueError(f"{name}: {len(values)} values for {steps} timestamps")
        return self

    def to_frame(self) -> pd.DataFrame:
        """Mean columns, then quantile columns named like `close_q0.1`, indexed by the future timestamps."""
        columns = {column: self.forecast[column] for column in CANDLE_COLUMNS if column in self.forecast}
        for label in sorted(self.quantiles, key=float):
            by_column = self.quantiles[label]
            columns.update(
                {f"{column}_q{label}": by_column[column] for column in CANDLE_COLUMNS if column in by_column}
            )
        return pd.DataFrame(columns, index=to_datetime_index(self.timestamps))


def _parse_label(label: str) -> float:
    try:
        return float(label)
    except ValueError:
        return float("nan")
