"""The Python producer's client: submit forecasts, follow them, read their results (torch-free).

    client = KronosClient()  # KRONOS_BROKER_URL / KRONOS_RESULT_BACKEND, or pass the URLs
    job = client.submit("candles.csv", pred_len=24, sample_count=8, quantiles=[0.1, 0.5, 0.9])
    job.poll()  # never blocks: JobStatus(state, result, error, progress)
    job.frame()  # waits, then the forecast as a DataFrame
    client.job(job.id).wait(timeout=60, progress=True)  # from any process

Job records. Celery reports PENDING for any id it holds no result for, so "queued" and "never heard of"
look alike. Before sending a job the client writes its record `kronos:job:<id>` in the result DB, with
SET NX and an expiry of KRONOS_RESULT_EXPIRES. A job is known while its record or its result key
(`celery-task-meta-<id>`) exists: the record covers the time before the worker first writes the result
key (STARTED, thanks to task_track_started), and it expires no later than the result, which lives that
long from when the job finishes. An id with neither is unknown or expired: JobNotFound. (A job still
queued after KRONOS_RESULT_EXPIRES would read as not found.)

Duplicate-safe resubmission. The same SET NX is the lock: a job id whose record or result already exists
is not sent again, and submit returns a handle on the existing job (`ForecastJob.duplicate`), whatever
that job's state, failed included: resend under a new id. The record holds the request's digest
(schemas.job_digest): the same id with a different request raises JobIdConflict (JOB_ID_CONFLICT) instead,
and the worker refuses such a request from any producer too. If the send itself fails, the record is
deleted, so the caller can retry with the same id.

Following a job reads the result key as any language would (docs/PRODUCERS.md) and listens on the
channel of the same name, where the worker publishes every state it stores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import redis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.transport.redis import Channel as RedisChannel
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from schemas import (
    CANDLE_COLUMNS,
    HEARTBEAT_KEY,
    ErrorCode,
    ForecastRequest,
    ForecastResult,
    JobError,
    JobFailed,
    WorkerHeartbeat,
    job_digest,
)
from schemas.candles import TIMESTAMP_COLUMNS
from schemas.error_translation import job_error_from_validation
from tasks.connections import redis_client, sentinel_transport_options, ssl_options
from tasks.keys import JOB_RECORD_PREFIX, RESULT_KEY_PREFIX
from tasks.producer import submit as send_job
from tasks.replication import NotReplicated, replication_options
from tasks.routing import (
    PRIORITY_STEPS,
    ForecastRouter,
    default_queue,
    forecast_queues,
    producer_job_id,
    queue_for_model,
    serving_queues,
)
from tasks.settings import KronosSettings, load_settings

__all__ = [
    "CandleDataError",
    "ForecastJob",
    "JobFailed",
    "JobIdConflict",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "KronosClient",
    "KronosClientError",
    "Progress",
    "RedisUnavailable",
    "checked_candles",
    "priority_list",
    "read_candles_csv",
]

FINISHED_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
REQUIRED_COLUMNS = ("open", "high", "low", "close")
# While waiting, the result key is read again this often even without a published update: a missed
# message (a reconnect) or an expired result must not leave a waiter blocked for good.
RECHECK_SECONDS = 2.0

CandleSource: TypeAlias = pd.DataFrame | str | os.PathLike


class KronosClientError(Exception):
    """Base of the errors the client raises itself (a failed job raises schemas.JobFailed)."""


class JobNotFound(KronosClientError, LookupError):
    def __init__(self, job_id: str, result_expires: int):
        self.job_id = job_id
        super().__init__(
            f"no job {job_id!r}: the id is unknown, or its result expired "
            f"(results are kept KRONOS_RESULT_EXPIRES={result_expires} s)"
        )


class JobIdConflict(JobFailed, KronosClientError):
    """submit() was given a job id that already names a different request (JOB_ID_CONFLICT): nothing was sent,
    and the job under that id keeps its own answer. Resend under a new id."""

    def __init__(self, job_id: str):
        super().__init__(
            JobError(
                code=ErrorCode.JOB_ID_CONFLICT,
                message=f"job_id: {job_id!r} already names a different request; nothing was sent, use a new id",
                field="job_id",
                job_id=job_id,
            )
        )


class JobTimeout(KronosClientError, TimeoutError):
    def __init__(self, job_id: str, timeout: float, status: JobStatus):
        self.job_id = job_id
        self.timeout = timeout
        self.status = status
        super().__init__(
            f"job {job_id} did not finish within {timeout:g} s (it is {status.describe()}); "
            "it goes on: wait again, or fetch it later by its id"
        )


class RedisUnavailable(KronosClientError, ConnectionError):
    """Redis did not answer (down, restarting, failing over). Retryable: a submit that raises this sent nothing
    that could run twice harmfully, and sending it again with the same job id is safe."""

    retryable = True

    def __init__(self, url: str, reason: str, variable: str):
        self.url = redact(url)
        super().__init__(f"cannot reach Redis at {self.url}: {reason}; is it running? set {variable}")


class JobNotAccepted(KronosClientError, ConnectionError):
    """The job reached the Redis master, but fewer replicas than KRONOS_REPLICAS_TO_ACK confirmed it in time, so
    a failover could lose it (tasks/replication.py). Retryable: submit again with the same job_id; the job runs
    once and has one answer however many copies arrive."""

    retryable = True

    def __init__(self, job_id: str, reason: str):
        self.job_id = job_id
        super().__init__(f"job {job_id} not accepted: {reason}; submit it again with job_id={job_id!r}")


class CandleDataError(KronosClientError, ValueError):
    """Candles that cannot be read as a series: an unreadable file, a missing column, a bad value."""


class Progress(NamedTuple):
    steps_done: int
    steps_total: int


@dataclass(frozen=True)
class JobStatus:
    """One reading of a job. `error` is set for FAILURE, and for RETRY (the attempt that failed)."""

    job_id: str
    state: str  # PENDING (queued), STARTED, PROGRESS, RETRY, SUCCESS, FAILURE, REVOKED
    result: ForecastResult | None = None
    error: JobError | None = None
    progress: Progress | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def describe(self) -> str:
        if self.progress is not None:
            return f"running, {self.progress.steps_done}/{self.progress.steps_total} steps"
        return {"PENDING": "queued", "STARTED": "running", "RETRY": "waiting to be retried"}.get(
            self.state, self.state.lower()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "progress": self.progress._asdict() if self.progress else None,
            "result": self.result.model_dump(mode="json") if self.result else None,
            "error": self.error.model_dump(mode="json") if self.error else None,
        }


class KronosClient:
    """Submit and follow forecast jobs. Use as a context manager, or call close()."""

    def __init__(self, broker_url: str | None = None, result_backend: str | None = None, producer: str | None = None):
        environ = dict(os.environ)
        if producer:
            environ["KRONOS_PRODUCER"] = producer
        if broker_url:
            environ["KRONOS_BROKER_URL"] = broker_url
            # Results go next to the broker given here, not to a backend configured for another Redis.
            environ.pop("KRONOS_RESULT_BACKEND", None)
        if result_backend:
            environ["KRONOS_RESULT_BACKEND"] = result_backend
        self.settings: KronosSettings = load_settings(environ)
        self._result_variable = "KRONOS_RESULT_BACKEND" if environ.get("KRONOS_RESULT_BACKEND") else "KRONOS_BROKER_URL"
        self.app = Celery("kronos-client")
        self.app.config_from_object("celeryconfig")
        # This client's settings, not the process's: its own URLs, producer and models decide the queues.
        self.app.conf.update(
            broker_url=self.settings.broker_url,
            result_backend=self.settings.result_backend,
            task_queues=forecast_queues(self.settings),
            task_default_queue=default_queue(self.settings),
            task_routes=(ForecastRouter(self.settings),),
            broker_use_ssl=ssl_options(self.settings, self.settings.broker_url),
            redis_backend_use_ssl=ssl_options(self.settings, self.settings.result_backend),
            broker_transport_options={
                **self.app.conf.broker_transport_options,
                **sentinel_transport_options(self.settings),
                **replication_options(self.settings.replicas_to_ack, self.settings.replica_ack_timeout),
            },
            result_backend_transport_options={
                **self.app.conf.result_backend_transport_options,
                **sentinel_transport_options(self.settings),
            },
        )
        self.results = _redis_client(self.settings.result_backend, self.settings)
        self.broker = _redis_client(self.settings.broker_url, self.settings)

    def __enter__(self) -> KronosClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.app.close()
        self.results.close()
        self.broker.close()

    def submit(
        self,
        candles: CandleSource,
        *,
        series_id: str | None = None,
        pred_len: int | None = None,
        freq: str | None = None,
        **options: Any,
    ) -> ForecastJob:
        """Enqueue one forecast and return at once. `candles` is a CSV path or a DataFrame (a DatetimeIndex
        or a timestamps column, plus open/high/low/close and optionally volume/amount); `options` are the
        other ForecastRequest fields (sample_count, quantiles, seed, model, priority, job_id, ...).
        An invalid request raises JobFailed (INVALID_INPUT) here, before anything is sent."""
        return self._send(self._request(candles, series_id=series_id, pred_len=pred_len, freq=freq, **options))

    def submit_many(
        self, series: Iterable[CandleSource] | Mapping[str, CandleSource], **options: Any
    ) -> list[ForecastJob]:
        """One job per series (a mapping gives each its series id), sharing `options`. Every request is
        checked before the first is sent, so an invalid one sends none."""
        if "job_id" in options:
            raise TypeError("submit_many gives each job its own id; submit jobs with chosen ids one by one")
        named = series.items() if isinstance(series, Mapping) else ((None, candles) for candles in series)
        requests = [self._request(candles, series_id=series_id, **options) for series_id, candles in named]
        return [self._send(request) for request in requests]

    def job(self, job_id: str) -> ForecastJob:
        """A handle on a job submitted by any process; JobNotFound if the id is unknown or expired.
        A producer's ids may be given with or without its "<producer>:" prefix."""
        job_id = producer_job_id(job_id, self.settings.producer)
        if not self._is_known(job_id):
            raise JobNotFound(job_id, self.settings.result_expires)
        return ForecastJob(self, job_id)

    def workers(self) -> list[WorkerHeartbeat]:
        """The heartbeats workers publish (schemas/heartbeat.py), stale ones included (see is_stale);
        a field that does not parse as a heartbeat is skipped."""
        with self._reaching(self.settings.broker_url, "KRONOS_BROKER_URL"):
            fields = self.broker.hgetall(HEARTBEAT_KEY)
        heartbeats = []
        for raw in fields.values():
            try:
                heartbeats.append(WorkerHeartbeat.model_validate_json(raw))
            except ValidationError:
                continue
        return sorted(heartbeats, key=lambda heartbeat: heartbeat.worker)

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each served model's queue, over all its priority lists: this producer's own queues
        when KRONOS_PRODUCER is set, else every producer's (KRONOS_PRODUCERS) or the shared ones."""
        settings = self.settings
        queues = [
            queue
            for model in settings.models
            for queue in ([queue_for_model(model, settings)] if settings.producer else serving_queues(model, settings))
        ]
        with self._reaching(self.settings.broker_url, "KRONOS_BROKER_URL"), self.broker.pipeline() as pipe:
            for queue in queues:
                for priority in PRIORITY_STEPS:
                    pipe.llen(priority_list(queue, priority))
            lengths = pipe.execute()
        steps = len(PRIORITY_STEPS)
        return {queue: sum(lengths[i * steps : (i + 1) * steps]) for i, queue in enumerate(queues)}

    def _request(
        self,
        candles: CandleSource,
        *,
        series_id: str | None = None,
        job_id: str | None = None,
        **fields: Any,
    ) -> ForecastRequest:
        frame = (
            checked_candles(candles, "the frame") if isinstance(candles, pd.DataFrame) else read_candles_csv(candles)
        )
        # The id is chosen here, not by the producer, so the job record can be written before the send.
        job_id = producer_job_id(job_id, self.settings.producer)
        default_series_id = job_id if isinstance(candles, pd.DataFrame) else Path(candles).stem
        document = {
            "job_id": job_id,
            "series_id": series_id or default_series_id,
            "candles": {"timestamps": frame.index.to_pydatetime().tolist(), **frame.to_dict(orient="list")},
            **{name: value for name, value in fields.items() if value is not None},
        }
        try:
            request = ForecastRequest.model_validate(document)
        except ValidationError as exc:
            raise JobFailed(job_error_from_validation(exc, job_id=job_id)) from None
        try:
            queue_for_model(request.model, self.settings)
        except ValueError as exc:
            raise JobFailed.invalid_input("model", str(exc), job_id=job_id) from None
        return request

    def _send(self, request: ForecastRequest) -> ForecastJob:
        job_id = request.job_id
        digest = job_digest(request)
        record = json.dumps(
            {"series_id": request.series_id, "model": request.model, "digest": digest, "submitted_at": time.time()}
        )
        with self._reaching_results(), self.results.pipeline() as pipe:
            pipe.set(JOB_RECORD_PREFIX + job_id, record, nx=True, ex=self.settings.result_expires)
            pipe.get(JOB_RECORD_PREFIX + job_id)
            pipe.exists(RESULT_KEY_PREFIX + job_id)
            recorded, existing, has_result = pipe.execute()
        if not recorded or has_result:
            if not recorded and _recorded_digest(existing) not in (None, digest):
                raise JobIdConflict(job_id)
            return ForecastJob(self, job_id, duplicate=True)
        try:
            with self._reaching(self.settings.broker_url, "KRONOS_BROKER_URL"):
                send_job(request, celery_app=self.app, settings=self.settings)
        except Exception as exc:
            # Nothing was queued, or nothing that will surely stay queued: let a retry with the same id send it.
            with self._reaching_results():
                self.results.delete(JOB_RECORD_PREFIX + job_id)
            if isinstance(exc, NotReplicated):
                raise JobNotAccepted(job_id, str(exc)) from None
            raise
        return ForecastJob(self, job_id)

    def _is_known(self, job_id: str) -> bool:
        with self._reaching_results():
            return bool(self.results.exists(JOB_RECORD_PREFIX + job_id, RESULT_KEY_PREFIX + job_id))

    def _reaching_results(self):
        return self._reaching(self.settings.result_backend, self._result_variable)

    @contextmanager
    def _reaching(self, url: str, variable: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, KombuOperationalError) as exc:
            if (not_replicated := _not_replicated(exc)) is not None:  # Redis answered: the caller says what it means
                raise not_replicated from None
            reason = str(exc).strip().rstrip(".") or type(exc).__name__
            raise RedisUnavailable(url, reason, variable) from None


def _not_replicated(exc: BaseException | None) -> NotReplicated | None:
    """The NotReplicated behind `exc` (Celery re-raises a publish's connection error as kombu's OperationalError)."""
    while exc is not None and not isinstance(exc, NotReplicated):
        exc = exc.__cause__ or exc.__context__
    return exc


def _recorded_digest(record: bytes | None) -> str | None:
    """The request digest in a job record; None for a record without one (written by an older client)."""
    try:
        digest = json.loads(record).get("digest") if record else None
    except (ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


class ForecastJob:
    """A submitted job. `duplicate` is True when submit found the job id already taken and sent nothing."""

    def __init__(self, client: KronosClient, job_id: str, *, duplicate: bool = False):
        self.client = client
        self.id = job_id
        self.duplicate = duplicate
        self._result: ForecastResult | None = None

    def __repr__(self) -> str:
        return f"ForecastJob({self.id!r})"

    @property
    def state(self) -> str:
        return self.poll().state

    def poll(self) -> JobStatus:
        """The job's state now, with its result or error once finished; never blocks."""
        with self.client._reaching_results():
            raw = self.client.results.get(RESULT_KEY_PREFIX + self.id)
        if raw is None:
            if not self.client._is_known(self.id):
                raise JobNotFound(self.id, self.client.settings.result_expires)
            return JobStatus(self.id, "PENDING")
        return status_from_meta(self.id, json.loads(raw))

    def wait(self, timeout: float | None = None, progress: bool = False) -> ForecastResult:
        """Block until the job finishes; its result, or JobFailed with the worker's structured error,
        or JobTimeout after `timeout` seconds. `progress` draws a bar on stderr."""
        if self._result is not None:
            return self._result
        bar = ProgressBar(sys.stderr, self.id) if progress else None
        try:
            status = self._follow(timeout, bar)
        finally:
            if bar is not None:
                bar.close()
        if status.error is not None:
            raise JobFailed(status.error)
        self._result = status.result
        return status.result

    def result(self, timeout: float | None = None) -> ForecastResult:
        """The forecast, waiting for it if the job has not finished (as concurrent.futures' result())."""
        return self.wait(timeout)

    def frame(self, timeout: float | None = None) -> pd.DataFrame:
        """The forecast indexed by its future timestamps: mean columns, then quantile columns (close_q0.1)."""
        return self.wait(timeout).to_frame()

    def _follow(self, timeout: float | None, bar: ProgressBar | None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        key = RESULT_KEY_PREFIX + self.id
        with self.client._reaching_results(), self.client.results.pubsub(ignore_subscribe_messages=True) as updates:
            updates.subscribe(key)
            # Read after subscribing, so that no update can fall between the read and the listening.
            status = self.poll()
            while not status.finished:
                if bar is not None:
                    bar.show(status)
                pause = RECHECK_SECONDS if deadline is None else min(RECHECK_SECONDS, deadline - time.monotonic())
                if pause <= 0:
                    raise JobTimeout(self.id, timeout, status)
                message = updates.get_message(timeout=pause)
                status = status_from_meta(self.id, json.loads(message["data"])) if message else self.poll()
        if bar is not None:
            bar.show(status)
        return status


class ProgressBar:
    """One line on a terminal stream, redrawn in place: queued, running, then steps done out of total."""

    WIDTH = 30

    def __init__(self, stream: IO[str], job_id: str):
        self.stream = stream
        self.job_id = job_id
        self.last_line = ""
        self.total: int | None = None

    def show(self, status: JobStatus) -> None:
        if status.progress is not None:
            self.total = status.progress.steps_total
            line = self._bar(status.progress.steps_done, self.total)
        elif status.state == "SUCCESS" and self.total is not None:
            line = self._bar(self.total, self.total)
        else:
            line = f"{self.job_id}  {status.describe()}"
        if line != self.last_line:
            padding = " " * max(0, len(self.last_line) - len(line))
            self.stream.write(f"\r{line}{padding}")
            self.stream.flush()
            self.last_line = line

    def close(self) -> None:
        if self.last_line:
            self.stream.write("\n")
            self.stream.flush()

    def _bar(self, done: int, total: int) -> str:
        filled = self.WIDTH * done // max(total, 1)
        return f"{self.job_id}  [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} steps"


def status_from_meta(job_id: str, meta: Mapping[str, Any]) -> JobStatus:
    """A JobStatus from the JSON a worker stores under celery-task-meta-<id>."""
    state = meta.get("status", "PENDING")
    stored = meta.get("result")
    if state == "SUCCESS":
        return JobStatus(job_id, state, result=ForecastResult.model_validate(stored))
    if state == "PROGRESS" and isinstance(stored, Mapping):
        return JobStatus(job_id, state, progress=Progress(int(stored["steps_done"]), int(stored["steps_total"])))
    if state in ("FAILURE", "REVOKED", "RETRY"):
        return JobStatus(job_id, state, error=error_from_exception(job_id, stored))
    return JobStatus(job_id, state)


def error_from_exception(job_id: str, stored: Any) -> JobError:
    """The JobError inside a stored exception: JobFailed's argument, or INTERNAL naming any other exception
    (a revoked job, a worker lost mid-job)."""
    stored = stored if isinstance(stored, Mapping) else {}
    arguments = stored.get("exc_message") or []
    if stored.get("exc_type") == "JobFailed" and arguments and isinstance(arguments[0], Mapping):
        return JobError.model_validate(arguments[0])
    words = " ".join(str(argument) for argument in arguments) if isinstance(arguments, list) else str(arguments)
    message = f"{stored.get('exc_type', 'unknown error')}: {words}".rstrip(": ")
    return JobError(code=ErrorCode.INTERNAL, message=message, job_id=job_id)


def priority_list(queue: str, priority: int) -> str:
    """The Redis list holding a queue's jobs of one priority (kombu's Redis transport: 0 is the queue's own
    name, p > 0 is `<queue>\\x06\\x16<p>`); every step exists, as celeryconfig sets all ten."""
    return f"{queue}{RedisChannel.sep}{priority}" if priority else queue


def read_candles_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A candle CSV as a frame indexed by its timestamps, with float candle columns; CandleDataError names
    the file and line of the first problem."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise CandleDataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CandleDataError(f"{path}: is a directory, not a CSV file") from None
    except PermissionError:
        raise CandleDataError(f"{path}: permission denied") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CandleDataError(f"{path}: not a readable CSV file ({reason})") from None
    # Line 1 is the header.
    return checked_candles(frame, str(path), position=lambda row: f"{path}: line {row + 2}")


def checked_candles(frame: pd.DataFrame, source: str, position: Callable[[int], str] | None = None) -> pd.DataFrame:
    """The candle columns of `frame` as floats, indexed by its DatetimeIndex or its timestamp column; other
    columns are dropped. CandleDataError names `source` and, through `position`, the offending row."""
    position = position or (lambda row: f"{source}: row {row}")
    index = frame.index if isinstance(frame.index, pd.DatetimeIndex) else _timestamp_index(frame, source, position)
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise CandleDataError(
            f"{source}: missing column(s) {', '.join(missing)}; candles need timestamps, open, high, low, close "
            "and optionally volume, amount"
        )
    columns = {}
    for column in (column for column in CANDLE_COLUMNS if column in frame.columns):
        values = pd.to_numeric(frame[column], errors="coerce")
        not_numbers = values.isna() & frame[column].notna()
        if not_numbers.any():
            row = int(not_numbers.to_numpy().argmax())
            raise CandleDataError(f"{position(row)}: {column} {frame[column].iloc[row]!r} is not a number")
        columns[column] = values.astype(float).to_numpy()
    return pd.DataFrame(columns, index=index)


def _timestamp_index(frame: pd.DataFrame, source: str, position: Callable[[int], str]) -> pd.DatetimeIndex:
    column = next((name for name in TIMESTAMP_COLUMNS if name in frame.columns), None)
    if column is None:
        raise CandleDataError(
            f"{source}: no timestamp column; name it one of {', '.join(TIMESTAMP_COLUMNS)} "
            f"(found: {', '.join(map(str, frame.columns)) or 'no columns'})"
        )
    try:
        parsed = pd.to_datetime(frame[column], format="ISO8601", errors="coerce")
    except (ValueError, TypeError) as exc:  # e.g. timestamps with different UTC offsets in one column
        raise CandleDataError(f"{source}: column {column}: {exc}") from None
    unparsed = parsed.isna()
    if unparsed.any():
        row = int(unparsed.to_numpy().argmax())
        raise CandleDataError(
            f"{position(row)}: {column} {frame[column].iloc[row]!r} is not an ISO 8601 date-time "
            "(e.g. 2024-06-18 11:15:00)"
        )
    return pd.DatetimeIndex(parsed, name="timestamps")


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}" + (f":{parts.port}" if parts.port else "")))


def _redis_client(url: str, settings: KronosSettings) -> redis.Redis:
    return redis_client(
        url,
        settings,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_connect_timeout,
        # A producer should hear of a Redis outage within a second, not after redis-py's default retries.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 2),
    )
