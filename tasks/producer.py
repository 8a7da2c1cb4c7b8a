"""Enqueue forecast jobs: the Python producer's API (torch-free).

A job is FORECAST_TASK with one positional argument, the ForecastRequest as JSON, routed to its model's
queue. The Celery task id is the job id: the request's `job_id` when the caller chose one, so that a
resubmission with the same id names the same job, else a new UUID; either way in the producer's namespace
("<KRONOS_PRODUCER>:<id>", tasks/routing.py) when the process names its producer.
"""

import time

from celery import Celery
from celery.result import AsyncResult

from schemas import ForecastRequest
from tasks.app import app
from tasks.routing import FORECAST_TASK, producer_job_id, queue_for_model
from tasks.settings import KronosSettings, current_settings

SENT_AT_HEADER = "kronos_sent_at"  # epoch seconds; lets the worker report the job's queue wait


def submit(
    request: ForecastRequest,
    *,
    priority: int | None = None,
    countdown: float | None = None,
    celery_app: Celery | None = None,
    settings: KronosSettings | None = None,
) -> AsyncResult:
    """Enqueue one job; returns at once with its AsyncResult (`.id` is the job id)."""
    settings = settings or current_settings()
    job_id = producer_job_id(request.job_id, settings.producer)
    if request.job_id is not None:
        request = request.model_copy(update={"job_id": job_id})
    options = {"priority": request.priority if priority is None else priority}
    return (celery_app or app).send_task(
        FORECAST_TASK,
        args=[request.model_dump(mode="json", exclude_none=True)],
        task_id=job_id,
        queue=queue_for_model(request.model, settings),
        headers={SENT_AT_HEADER: time.time()},
        countdown=countdown,
        **{k: v for k, v in options.items() if v is not None},
    )
