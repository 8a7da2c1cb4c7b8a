"""The forecast job contract: what producers send, what workers return, and how jobs fail.
Depends only on pydantic, pandas and numpy, so a producer installs it without torch."""

from schemas.candles import CANDLE_COLUMNS, Candles, Column
from schemas.errors import RETRYABLE_CODES, ErrorCode, JobError, JobFailed
from schemas.fields import MAX_ABS_VALUE
from schemas.heartbeat import HEARTBEAT_KEY, WorkerHeartbeat
from schemas.jsonschema import json_schemas
from schemas.limits import Limits
from schemas.request import ForecastRequest
from schemas.result import ForecastResult, Timings, quantile_label
from schemas.validation import job_digest, validate_job

__all__ = [
    "CANDLE_COLUMNS",
    "HEARTBEAT_KEY",
    "MAX_ABS_VALUE",
    "RETRYABLE_CODES",
    "Candles",
    "Column",
    "ErrorCode",
    "ForecastRequest",
    "ForecastResult",
    "JobError",
    "JobFailed",
    "Limits",
    "Timings",
    "WorkerHeartbeat",
    "job_digest",
    "json_schemas",
    "quantile_label",
    "validate_job",
]
