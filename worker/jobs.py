"""One forecast job's path through the worker: check, prepare, batch, build the result; or fail, or retry.

Failures are `JobFailed` carrying a structured error. Invalid input, an expired deadline and a timeout
fail at once; retryable codes (INTERNAL, RESOURCE_EXHAUSTED, MODEL_NOT_READY) go back to the queue
through Celery's own retry, with exponential backoff and jitter, so that each attempt shows as RETRY in
Flower and the event stream, until KRONOS_MAX_RETRIES is spent and the job fails with its code.
"""

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from celery import Task

from model import InvalidInputError, PreparedSeries, SeriesForecast, SeriesInput
from schemas import (
    ErrorCode,
    ForecastRequest,
    ForecastResult,
    JobError,
    JobFailed,
    Limits,
    quantile_label,
    validate_job,
)
from tasks.producer import SENT_AT_HEADER
from worker import faults
from worker.batching import Batcher, BatchOutcome, DeadlinePassed, WorkItem
from worker.lifecycle import ServingModel
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineJob:
    """What the batcher hands the engine for one job."""

    prepared: PreparedSeries
    fault: faults.Fault | None
    attempt: int


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | faults.SimulatedOutOfMemory)


def make_batch_runner(serving: ServingModel, inject_faults: bool) -> Callable:
    def run_batch(jobs: Sequence[EngineJob], progress) -> list[SeriesForecast]:
        if inject_faults:
            faults.apply([(job.fault, job.attempt) for job in jobs], len(jobs))
        return serving.engine.forecast_prepared([job.prepared for job in jobs], progress=progress)

    return run_batch


def backoff_seconds(retries: int, first: float, cap: float) -> float:
    """Exponential backoff with equal jitter: between half and all of min(cap, first * 2**retries)."""
    ceiling = min(cap, first * 2**retries)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class JobObserver:
    """Told about every job's outcome (metrics, logs, the dead-letter list). Observers must not raise."""

    def job_started(self, task: Task) -> None:
        """A job begins in this worker (any attempt)."""

    def job_succeeded(self, task: Task, result: ForecastResult) -> None:
        """Its result is about to be returned (and stored by Celery)."""

    def job_failed(self, task: Task, payload, error: JobError, will_retry: bool) -> None:
        """It failed with `error`; `will_retry` when it goes back to the queue for another attempt."""


class JobRunner:
    def __init__(
        self,
        serving: ServingModel,
        batcher: Batcher,
        settings: WorkerSettings,
        limits: Limits,
        max_job_seconds: float,
        store_progress: Callable[[str, dict], None],
        observers: Sequence[JobObserver] = (),
    ):
        self.serving = serving
        self.batcher = batcher
        self.settings = settings
        self.limits = limits
        self.max_job_seconds = max_job_seconds
        self.store_progress = store_progress
        self.observers = observers

    def run(self, task: Task, payload) -> dict:
        """The task body: the result as JSON, or raise JobFailed, or Celery's Retry."""
        job_id = task.request.id
        self._notify("job_started", task)
        try:
            result = self._run(task, payload, job_id)
        except JobFailed as failure:
            error = failure.error if failure.error.job_id else failure.error.model_copy(update={"job_id": job_id})
            raise self._retry_or_fail(task, payload, JobFailed(error)) from None
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            failure = JobFailed.of(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", job_id=job_id)
            raise self._retry_or_fail(task, payload, failure) from None
        self._notify("job_succeeded", task, result)
        return result.model_dump(mode="json")

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # an observer's bug must not change a job's outcome
                log.exception("observer %r failed on %s", observer, event)

    def _retry_or_fail(self, task: Task, payload, failure: JobFailed) -> Exception:
        error = failure.error
        will_retry = error.retryable and task.request.retries < self.settings.max_retries
        self._notify("job_failed", task, payload, error, will_retry)
        if not will_retry:
            log.warning("job %s failed: %s %s", error.job_id, error.code, error.message)
            return failure
        countdown = backoff_seconds(task.request.retries, self.settings.retry_backoff, self.settings.retry_backoff_max)
        log.warning("job %s: %s, retry %d in %.1f s", error.job_id, error.code, task.request.retries + 1, countdown)
        return task.retry(exc=failure, countdown=countdown, max_retries=self.settings.max_retries)

    def _run(self, task: Task, payload, job_id: str) -> ForecastResult:
        started = time.time()
        sent_at = _sent_at(task)
        request = validate_job(payload, self.limits)
        if request.deadline is not None and request.deadline.timestamp() < started:
            raise JobFailed.of(
                ErrorCode.EXPIRED,
                f"deadline: {request.deadline.isoformat()} passed before the job started; it was not run",
                field="deadline",
            )
        self._check_model(request)
        prepared = self._prepare(request)
        preprocess = time.time() - started

        item = WorkItem(
            EngineJob(prepared, faults.Fault.parse(request.series_id), task.request.retries),
            job_id,
            steps=prepared.pred_len,
            deadline=request.deadline.timestamp() if request.deadline else None,
            on_progress=self._progress_reporter(job_id),
        )
        outcome = self._wait(self.batcher.submit(item))
        finished = time.time()
        queue_wait = None if sent_at is None else max(0.0, started - sent_at)
        timings = {
            "queue_wait": queue_wait,
            "preprocess": preprocess,
            "batch_wait": outcome.batch_wait_seconds,
            "inference": outcome.inference_seconds,
            "total": finished - (started if sent_at is None else min(sent_at, started)),
        }
        return build_result(request, job_id, outcome, self.serving, task.request.hostname or "", timings)

    def _check_model(self, request: ForecastRequest) -> None:
        info = self.serving.engine.info
        if request.model != self.serving.name:
            raise JobFailed.of(
                ErrorCode.INVALID_INPUT,
                f"model: {request.model!r} is not served on this queue (it serves {self.serving.name!r})",
                field="model",
            )
        if request.model_revision is not None and request.model_revision != info.predictor_revision:
            # another worker of the queue may hold it (during a rolling update): retryable
            raise JobFailed.of(
                ErrorCode.MODEL_NOT_READY,
                f"model_revision: {request.model_revision} is not loaded here (serving {info.predictor_revision})",
                field="model_revision",
            )

    def _prepare(self, request: ForecastRequest) -> PreparedSeries:
        series = SeriesInput(
            candles=request.to_frame(),
            future_timestamps=request.resolved_future_timestamps(),
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            sample_count=request.sample_count,
            seed=request.seed,
            quantiles=request.quantiles,
            return_paths=request.return_paths,
        )
        try:
            return self.serving.engine.prepare(series)
        except InvalidInputError as exc:
            raise JobFailed.of(ErrorCode.INVALID_INPUT, str(exc), field=exc.field) from None

    def _wait(self, future) -> BatchOutcome:
        try:
            return future.result(timeout=self.max_job_seconds)
        except FutureTimeout:
            raise JobFailed.of(
                ErrorCode.TIMEOUT, f"no result within KRONOS_MAX_JOB_SECONDS ({self.max_job_seconds:g} s)"
            ) from None
        except DeadlinePassed as exc:
            message = f"deadline: {exc} while waiting for a batch"
            raise JobFailed.of(ErrorCode.EXPIRED, message, field="deadline") from None
        except InvalidInputError as exc:
            raise JobFailed.of(ErrorCode.INVALID_INPUT, str(exc), field=exc.field) from None
        except Exception as exc:
            if is_out_of_memory(exc):
                message = f"out of memory even alone in a batch: {exc}"
                raise JobFailed.of(ErrorCode.RESOURCE_EXHAUSTED, message) from None
            log.exception("inference failed")
            raise JobFailed.of(ErrorCode.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}") from None

    def _progress_reporter(self, job_id: str) -> Callable[[int, int], None]:
        last = -float("inf")

        def report(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done >= total or now - last < self.settings.progress_interval:
                return
            last = now
            try:
                self.store_progress(job_id, {"steps_done": done, "steps_total": total})
            except Exception as exc:  # progress is advisory: never fail a job over it
                log.warning("job %s: progress not stored: %r", job_id, exc)

        return report


def _sent_at(task: Task) -> float | None:
    value = (task.request.headers or {}).get(SENT_AT_HEADER)
    return float(value) if isinstance(value, int | float) else None


def build_result(
    request: ForecastRequest, job_id: str, outcome: BatchOutcome, serving: ServingModel, worker: str, timings: dict
) -> ForecastResult:
    forecast: SeriesForecast = outcome.output
    info = serving.engine.info
    columns = list(forecast.mean.columns)
    paths = None
    if forecast.paths is not None:
        paths = {column: forecast.paths[:, :, i].tolist() for i, column in enumerate(columns)}
    return ForecastResult(
        job_id=job_id,
        series_id=request.series_id,
        model=request.model,
        model_id=info.predictor,
        model_revision=info.predictor_revision,
        tokenizer_id=info.tokenizer,
        tokenizer_revision=info.tokenizer_revision,
        timestamps=list(forecast.mean.index.to_pydatetime()),
        forecast={column: forecast.mean[column].tolist() for column in columns},
        quantiles={
            quantile_label(q): {column: frame[column].tolist() for column in columns}
            for q, frame in forecast.quantiles.items()
        },
        paths=paths,
        sample_count=request.sample_count,
        seed=forecast.seed,
        worker=worker,
        device=serving.device,
        batch_size=outcome.batch_size,
        timings=timings,
        finished_at=datetime.now(UTC),
        synthetic_model=serving.synthetic,
    )
