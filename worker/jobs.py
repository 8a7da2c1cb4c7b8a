"""One forecast job's path through the worker: claim, check, prepare, batch, store the answer; or fail, or retry.

Exactly one final answer per job. A delivery runs only once it holds the job's claim (worker/claims.py): a
job whose answer is stored is acknowledged without running, a copy of a job running elsewhere comes back
later, and a request sent under an id that names another request is refused (JOB_ID_CONFLICT). The runner
stores the job's states itself through the worker's result backend (worker/results.py): the final answer in
one compare-and-set that nothing replaces, retried while Redis is away for as long as the delivery's
visibility timeout allows (then the message is handed back, not failed); STARTED, PROGRESS and RETRY best
effort, never waited on.

Failures are `JobFailed` carrying a structured error. Invalid input, an expired deadline and a timeout
fail at once; retryable codes (INTERNAL, RESOURCE_EXHAUSTED, MODEL_NOT_READY) go back to the queue
through Celery's own retry, with exponential backoff and jitter, so that each attempt shows as RETRY in
Flower and the event stream, until KRONOS_MAX_RETRIES is spent and the job fails with its code.

A job pinned to a `model_revision` runs only on an engine of that revision: a worker serving another one
(before or after a rolling update) answers MODEL_NOT_READY, which is retried, so that a worker holding the
revision serves it; when the retries are spent it fails with MODEL_NOT_READY. While the worker's circuit
breaker is open (worker/circuit.py) a job it fetched earlier is rejected back to the queue unstarted.

A job from a producer's queue is charged to that producer's quota on its first run (worker/quotas.py): over
it, the job fails with RATE_LIMITED, or is sent back to its queue to run at its reserved slot.
"""

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from celery import Task, states
from celery.exceptions import Reject, Retry

from model import InvalidInputError, ModelInfo, PreparedSeries, SeriesForecast, SeriesInput
from schemas import (
    ErrorCode,
    ForecastRequest,
    ForecastResult,
    JobError,
    JobFailed,
    Limits,
    job_digest,
    quantile_label,
    validate_job,
)
from tasks.producer import SENT_AT_HEADER
from worker import faults, lifecycle
from worker.batching import Batcher, BatchOutcome, DeadlinePassed, WorkItem
from worker.claims import CLAIMED, CONFLICT, FINAL, Claim, Claims, LeaseKeeper
from worker.lifecycle import ServingSlot
from worker.quotas import ADMITTED, RESERVED, ProducerQuotas
from worker.results import RedisUnreachable, ResultBackend, retry_transient
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

PROGRESS = "PROGRESS"  # a custom state: steps done of the job's horizon, while its batch runs
# A copy of a job held elsewhere comes back this long after the holder's lease would lapse.
HELD_RECHECK_MARGIN = 0.5


@dataclass(frozen=True)
class EngineJob:
    """What the batcher hands the engine for one job."""

    prepared: PreparedSeries
    fault: faults.Fault | None
    attempt: int


@dataclass(frozen=True)
class ServedBy:
    """The engine that computed a batch, as its results name it (the served one may change after it)."""

    info: ModelInfo
    device: str
    synthetic: bool


@dataclass(frozen=True)
class ServedForecast:
    """One job's output of a batch."""

    forecast: SeriesForecast
    served_by: ServedBy


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | faults.SimulatedOutOfMemory)


FaultHook = Callable[[Sequence[EngineJob]], None]


def fault_injector(client, worker_fault_key: str | None) -> FaultHook:
    """Test-only: acts on a batch's fault directives (and the worker-wide fault key) before the engine runs."""

    def inject(jobs: Sequence[EngineJob]) -> None:
        if worker_fault_key:
            faults.raise_while_key_exists(client, worker_fault_key)
        faults.apply([(job.fault, job.attempt) for job in jobs], len(jobs))

    return inject


def make_batch_runner(slot: ServingSlot, inject_faults: FaultHook | None = None) -> Callable:
    """The Batcher's engine call: it reads the served engine per batch, so a rolling update takes effect
    between two batches, and each output names the engine that computed it."""

    def run_batch(jobs: Sequence[EngineJob], progress) -> list[ServedForecast]:
        if inject_faults is not None:
            inject_faults(jobs)
        with slot.use() as serving:
            forecasts = serving.engine.forecast_prepared([job.prepared for job in jobs], progress=progress)
            served_by = ServedBy(serving.engine.info, serving.device, serving.synthetic)
        return [ServedForecast(forecast, served_by) for forecast in forecasts]

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

    def job_over_quota(self, task: Task, producer: str, action: str) -> None:
        """It was over `producer`'s quota and was "rejected" (then job_failed follows) or "delayed"."""

    def job_not_run(self, task: Task, reason: str) -> None:
        """A delivery of the job that did not run (worker/claims.py): its answer was "final" already, another
        run "held" it, or its id names a different request ("conflict")."""

    def job_taken_over(self, task: Task, runs: int) -> None:
        """This run took the job over from a run whose lease lapsed: the job's model run number `runs`."""


class QuotaWait(Exception):
    """The job holds a token `seconds` from now: run it then."""

    def __init__(self, seconds: float, error: JobError):
        super().__init__(seconds, error)
        self.seconds = seconds
        self.error = error


class JobRunner:
    def __init__(
        self,
        slot: ServingSlot,
        batcher: Batcher,
        settings: WorkerSettings,
        limits: Limits,
        max_job_seconds: float,
        results: ResultBackend,
        claims: Claims,
        leases: LeaseKeeper,
        visibility_timeout: float,
        observers: Sequence[JobObserver] = (),
        refusal: Callable[[], str | None] = lambda: None,
        quotas: ProducerQuotas | None = None,
        producer_of: Callable[[Task], str | None] = lambda task: None,
    ):
        self.slot = slot
        self.batcher = batcher
        self.settings = settings
        self.limits = limits
        self.max_job_seconds = max_job_seconds
        self.results = results  # every state this runner stores goes through it (final answers never replaced)
        self.claims = claims
        self.leases = leases
        self.visibility_timeout = visibility_timeout
        self.observers = observers
        self.refusal = refusal  # why this worker must not start jobs now (its circuit is open), or None
        self.quotas = quotas
        self.producer_of = producer_of  # the producer whose queue the job came from; None on shared queues

    def run(self, task: Task, payload) -> dict | None:
        """The task body. It stores the job's states itself (the task ignores Celery's result storing) and
        returns the result as JSON, or None for a delivery that did not run; or raises JobFailed (stored),
        Celery's Retry, or Reject."""
        job_id = task.request.id
        refused = self.refusal()
        if refused is not None:
            # Back to the head of the queue, unstarted and without spending a retry, for a healthy worker.
            log.warning("job %s: not started here (%s); returned to the queue", job_id, refused)
            raise Reject(refused, requeue=True)
        # The message's visibility clock started at its fetch, before now: what this delivery may still spend
        # on Redis calls that must succeed, before a second worker may be handed the job.
        deadline = time.monotonic() + self.visibility_timeout
        request, invalid, digest = _validated(payload, self.limits)
        try:
            claim = retry_transient(lambda: self.claims.claim(job_id, digest), deadline, f"job {job_id}: claim")
        except RedisUnreachable as exc:
            raise Reject(str(exc), requeue=True) from None
        except Exception as exc:  # Redis refused the script (its ACL?): unclaimed, the job must not run nor be lost
            log.exception("job %s: the claim failed; returned to the queue", job_id)
            raise Reject(f"claim failed: {exc!r}", requeue=True) from None
        if claim.state != CLAIMED:
            return self._not_run(task, claim, digest)
        self.leases.hold(job_id, claim.token)
        try:
            return self._run_claimed(task, payload, request, invalid, claim, deadline)
        finally:
            self.leases.let_go(job_id, claim.token)

    def _not_run(self, task: Task, claim: Claim, digest: str) -> None:
        job_id = task.request.id
        self._notify("job_not_run", task, claim.state)
        if claim.state == FINAL:
            log.info("job %s: its final answer (%s) is stored; acknowledged without running", job_id, claim.detail)
            return None
        if claim.state == CONFLICT:
            error = self.claims.record_conflict(job_id, digest, claim.detail)
            log.warning("job %s: %s", job_id, error.message)
            return None
        # HELD: another run holds a live lease. Come back when it may have lapsed; if that run stores the
        # answer first, the copy then finds it and is acknowledged.
        seconds = claim.held_seconds + HELD_RECHECK_MARGIN
        log.info("job %s: running elsewhere (lease for %.1f s more); this copy comes back then", job_id, seconds)
        try:
            retry = self._send_back(task, seconds, f"job {job_id} is running elsewhere")
        except Exception as exc:  # not sent back: the message itself goes back to the queue
            raise Reject(f"job {job_id} runs elsewhere; this copy was not delayed: {exc!r}", requeue=True) from None
        raise retry

    def _run_claimed(self, task: Task, payload, request, invalid, claim: Claim, deadline: float) -> dict:
        job_id = task.request.id
        if claim.takeover:
            log.warning("job %s: run %d, taking over from a run whose lease lapsed", job_id, claim.runs)
            self._notify("job_taken_over", task, claim.runs)
        self._notify("job_started", task)
        self.results.store_result(job_id, {"pid": os.getpid(), "hostname": task.request.hostname}, states.STARTED,
                                  request=task.request)  # fmt: skip
        try:
            if invalid is not None:  # answered as such whatever the quota: sending it again cannot help
                raise invalid
            self._charge_quota(task, job_id, claim)
            result = self._run(task, request, job_id)
        except QuotaWait as wait:
            self.claims.release(job_id, claim.token)
            raise self._delay(task, payload, wait, claim, deadline) from None
        except JobFailed as failure:
            error = failure.error if failure.error.job_id else failure.error.model_copy(update={"job_id": job_id})
            raise self._retry_or_fail(task, payload, JobFailed(error), claim, deadline) from None
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            failure = JobFailed.of(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", job_id=job_id)
            raise self._retry_or_fail(task, payload, failure, claim, deadline) from None
        document = result.model_dump(mode="json")
        self._store_final(task, document, states.SUCCESS, deadline)
        self._notify("job_succeeded", task, result)
        return document

    def _store_final(self, task: Task, value, state: str, deadline: float) -> None:
        """Store the job's final answer (retrying while Redis is away); when that cannot be done in the time
        the job has, hand the message back for another delivery rather than fail or acknowledge it."""
        try:
            self.results.store_result(task.request.id, value, state, request=task.request, deadline=deadline)
        except RedisUnreachable as exc:
            log.error("job %s: %s; the job is left to be delivered again", task.request.id, exc)
            raise Reject(str(exc), requeue=True) from None

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # an observer's bug must not change a job's outcome
                log.exception("observer %r failed on %s", observer, event)

    def _retry_or_fail(self, task: Task, payload, failure: JobFailed, claim: Claim, deadline: float) -> Exception:
        error = failure.error
        will_retry = error.retryable and task.request.retries < self.settings.max_retries
        self._notify("job_failed", task, payload, error, will_retry)
        if not will_retry:
            log.warning("job %s failed: %s %s", error.job_id, error.code, error.message)
            self._store_final(task, failure, states.FAILURE, deadline)
            return failure
        countdown = backoff_seconds(task.request.retries, self.settings.retry_backoff, self.settings.retry_backoff_max)
        log.warning("job %s: %s, retry %d in %.1f s", error.job_id, error.code, task.request.retries + 1, countdown)
        self.claims.release(task.request.id, claim.token)
        self.results.store_result(task.request.id, failure, states.RETRY, request=task.request)
        return task.retry(exc=failure, countdown=countdown, max_retries=self.settings.max_retries)

    def _charge_quota(self, task: Task, job_id: str, claim: Claim) -> None:
        """Raise RATE_LIMITED, or QuotaWait, for a job's first run over its producer's quota. "First" is the
        claim's count, kept in Redis by workers: a message's retry count is written by whoever sent it."""
        producer = self.producer_of(task)
        if self.quotas is None or producer is None or claim.runs > 1:
            return
        verdict = self.quotas.take(producer, job_id)
        if verdict.outcome == ADMITTED:
            return
        details = {"producer": producer, "limit_per_minute": verdict.limit_per_minute, "retry_after": verdict.wait}
        quota = f"producer {producer} is over its quota of {verdict.limit_per_minute} jobs per minute"
        if verdict.outcome == RESERVED:
            self._notify("job_over_quota", task, producer, "delayed")
            error = JobError(code=ErrorCode.RATE_LIMITED, message=f"{quota}; runs in {verdict.wait:.1f} s",
                             details=details, job_id=job_id)  # fmt: skip
            raise QuotaWait(verdict.wait, error)
        self._notify("job_over_quota", task, producer, "rejected")
        message = f"{quota}; a token is free in {verdict.wait:.1f} s"
        raise JobFailed.of(ErrorCode.RATE_LIMITED, message, details=details)

    def _send_back(self, task: Task, seconds: float, reason: str) -> Retry:
        """Send the job back to its own queue to run `seconds` from now, keeping its retry count; the Retry to
        raise so that Celery acknowledges this delivery. Raises when the new message cannot be sent."""
        later = task.signature_from_request(task.request, countdown=seconds, retries=task.request.retries)
        later.apply_async()
        return Retry(reason, when=seconds, sig=later)

    def _delay(self, task: Task, payload, wait: QuotaWait, claim: Claim, deadline: float) -> Exception:
        """Send the job back to its own queue to run at its reserved token, as attempt 0 again."""
        try:
            retry = self._send_back(task, wait.seconds, wait.error.message)
        except Exception as exc:  # not sent back: an ordinary retry (its token is already paid)
            failure = JobFailed.of(ErrorCode.INTERNAL, f"could not delay the job: {exc!r}", job_id=task.request.id)
            return self._retry_or_fail(task, payload, failure, claim, deadline)
        self._notify("job_failed", task, payload, wait.error, True)
        log.info("job %s: %s", task.request.id, wait.error.message)
        return Retry(wait.error.message, JobFailed(wait.error), when=wait.seconds, sig=retry.sig)

    def _run(self, task: Task, request: ForecastRequest, job_id: str) -> ForecastResult:
        started = time.time()
        sent_at = _sent_at(task)
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
        served_by = outcome.output.served_by
        if request.model_revision is not None and request.model_revision != served_by.info.predictor_revision:
            # the worker switched revisions between this job's check and its batch: a pin is never broken
            raise JobFailed.of(
                ErrorCode.MODEL_NOT_READY,
                f"model_revision: {request.model_revision} was replaced by {served_by.info.predictor_revision} "
                "while the job waited for its batch",
                field="model_revision",
            )
        finished = time.time()
        queue_wait = None if sent_at is None else max(0.0, started - sent_at)
        timings = {
            "queue_wait": queue_wait,
            "preprocess": preprocess,
            "batch_wait": outcome.batch_wait_seconds,
            "inference": outcome.inference_seconds,
            "total": finished - (started if sent_at is None else min(sent_at, started)),
        }
        return build_result(request, job_id, outcome, task.request.hostname or "", timings)

    def _check_model(self, request: ForecastRequest) -> None:
        serving = self.slot.current
        info = serving.engine.info
        if request.model != serving.name:
            raise JobFailed.of(
                ErrorCode.INVALID_INPUT,
                f"model: {request.model!r} is not served on this queue (it serves {serving.name!r})",
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
        try:
            return self.slot.current.engine.prepare(series_input(request))
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
            # best effort: handed to the backend's writer thread, so the batch never waits on Redis
            self.results.store_result(job_id, {"steps_done": done, "steps_total": total}, PROGRESS)

        return report


def _validated(payload, limits: Limits) -> tuple[ForecastRequest | None, JobFailed | None, str]:
    """The request, or why it is invalid (raised once the job is claimed, so that it is answered once), and
    the request's digest: that of the well-formed request even when it is over a limit, as its client
    recorded it (schemas.job_digest), else that of the payload as sent."""
    try:
        request = validate_job(payload, limits)
    except JobFailed as invalid:
        try:
            digest = job_digest(ForecastRequest.model_validate(payload))
        except Exception:  # not a request at all
            digest = job_digest(payload)
        return None, invalid, digest
    return request, None, job_digest(request)


def series_input(request: ForecastRequest) -> SeriesInput:
    """The engine's input for a job: the contract's request in the engine's terms."""
    return SeriesInput(
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


def _sent_at(task: Task) -> float | None:
    value = (task.request.headers or {}).get(SENT_AT_HEADER)
    return float(value) if isinstance(value, int | float) else None


def build_result(
    request: ForecastRequest, job_id: str, outcome: BatchOutcome, worker: str, timings: dict
) -> ForecastResult:
    output: ServedForecast = outcome.output
    forecast, served_by = output.forecast, output.served_by
    info = served_by.info
    columns = list(forecast.mean.columns)
    paths = None
    if forecast.paths is not None:
        paths = {column: forecast.paths[:, :, i].tolist() for i, column in enumerate(columns)}
    return ForecastResult(
        job_id=job_id,
        series_id=request.series_id,
        request_digest=job_digest(request),
        precision=info.precision,
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
        device=served_by.device,
        batch_size=outcome.batch_size,
        timings=timings,
        finished_at=datetime.now(UTC),
        synthetic_model=served_by.synthetic,
    )


def smoke_forecast(slot: ServingSlot, batcher: Batcher, timeout: float) -> None:
    """A small forecast through the batcher and the served engine, as a job's would run (test faults
    included); raises unless it produces a finite forecast. The circuit breaker's probe."""
    prepared = slot.current.engine.prepare(lifecycle.smoke_series())
    item = WorkItem(EngineJob(prepared, None, 0), "smoke-forecast", steps=prepared.future.size)
    lifecycle.check_forecast([batcher.submit(item).result(timeout=timeout).output.forecast])
