"""Structured logs: every log record of the worker process as one JSON line, and one line per finished job.

With KRONOS_LOG_FORMAT=json (the default) the worker's handlers (Celery sets them up; the after_setup_logger
and after_setup_task_logger signals hand them over) write lines such as

    {"timestamp": "2026-01-02T03:04:05.678+00:00", "level": "INFO", "logger": "kronos.jobs",
     "message": "job 5f3c... succeeded: ...", "job_id": "5f3c...", "series_id": "BTCUSDT-5m",
     "model": "kronos-small", "worker": "gpu0@host", "batch_id": 42, "batch_size": 8, "state": "succeeded",
     "timings": {"queue_wait": 0.012, "preprocess": 0.003, "batch_wait": 0.021, "inference": 0.41, ...}}

A line logged while a job runs carries that job's id and worker even when its logger knows neither.
With KRONOS_LOG_FORMAT=text Celery's own formats stay.
"""

import json
import logging
import threading
from datetime import UTC, datetime

# Celery's own task-aware formatter (celery.app.log.TaskFormatter) reads the running task the same way.
from celery._state import get_current_task

from schemas import ForecastResult, JobError
from worker.batching import BatchRun
from worker.jobs import JobObserver

log = logging.getLogger("kronos.jobs")

# Record attributes (set with `extra=`) that become fields of the JSON line.
CONTEXT_FIELDS = (
    "job_id", "series_id", "model", "worker", "batch_id", "batch_size", "state", "retries", "code", "error",
    "timings", "seconds",
)  # fmt: skip
# Jobs whose batch finished but whose outcome was never reported (a job that timed out waiting for it).
MAX_REMEMBERED_BATCHES = 10_000


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task = get_current_task()
        if task is not None and task.request.id is not None:
            line["job_id"] = task.request.id
            line["worker"] = task.request.hostname
        line.update((name, record.__dict__[name]) for name in CONTEXT_FIELDS if name in record.__dict__)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def use_json_lines(logger: logging.Logger, **_) -> None:
    """Receiver of Celery's after_setup_logger and after_setup_task_logger signals."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


class JobLog(JobObserver):
    """One log line per finished attempt: succeeded (INFO), retry or failed (WARNING), with its context."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch_of: dict[str, tuple[int, int]] = {}  # job id -> (batch id, batch size)

    def batch_done(self, run: BatchRun) -> None:
        """The on_batch hook runs before the batch's jobs get their results, so they find their batch here."""
        with self._lock:
            for job_id in run.job_ids:
                self._batch_of[job_id] = (run.batch_id, len(run.job_ids))
            while len(self._batch_of) > MAX_REMEMBERED_BATCHES:
                del self._batch_of[next(iter(self._batch_of))]
        log.debug(
            "batch %d: %d jobs in %.3f s", run.batch_id, len(run.job_ids), run.seconds,
            extra={"batch_id": run.batch_id, "batch_size": len(run.job_ids), "seconds": run.seconds},
        )  # fmt: skip

    def job_succeeded(self, task, result: ForecastResult) -> None:
        batch_id, _ = self._take_batch(task.request.id)
        timings = result.timings.model_dump()
        log.info(
            "job %s succeeded: series %s, batch %s of %d, %.3f s in total",
            result.job_id, result.series_id, batch_id, result.batch_size, result.timings.total,
            extra={
                "job_id": result.job_id, "series_id": result.series_id, "model": result.model,
                "worker": result.worker, "batch_id": batch_id, "batch_size": result.batch_size,
                "state": "succeeded", "retries": task.request.retries, "timings": timings,
            },
        )  # fmt: skip

    def job_failed(self, task, payload, error: JobError, will_retry: bool) -> None:
        batch_id, batch_size = self._take_batch(task.request.id)
        request = payload if isinstance(payload, dict) else {}
        state = "retry" if will_retry else "failed"
        log.warning(
            "job %s %s: %s %s", task.request.id, "will be retried" if will_retry else "failed", error.code,
            error.message,
            extra={
                "job_id": task.request.id, "series_id": request.get("series_id"), "model": request.get("model"),
                "worker": task.request.hostname, "batch_id": batch_id, "batch_size": batch_size, "state": state,
                "retries": task.request.retries, "code": error.code, "error": error.model_dump(mode="json"),
            },
        )  # fmt: skip

    def _take_batch(self, job_id: str) -> tuple[int | None, int | None]:
        with self._lock:
            return self._batch_of.pop(job_id, (None, None))
