"""The worker process: `celery -A worker.app worker`.

One process serves one model on one device: it consumes only that model's queues (the shared one, or one per
producer: tasks/routing.py), loads the model once before it takes any job, runs jobs in a threads pool whose
threads feed one batching thread, and releases the model at shutdown. A process that cannot load its model
exits with status 3 and says why; it never consumes a job. `python -m worker.launch` starts one such process
per GPU. Here: the Celery configuration only the worker has, and the forecast task; the parts that serve it
are Celery bootsteps (worker/steps.py).
"""

from celery import Task, signals

from schemas import ErrorCode, JobFailed
from tasks.app import app
from tasks.routing import FORECAST_TASK
from tasks.settings import current_settings
from worker import logs, steps
from worker.jobs import JobRunner
from worker.settings import current_worker_settings

settings = current_worker_settings()
# Jobs run in threads of this process, which owns the model and the batching thread; prefork children
# would each need their own copy of the weights and could not share batches.
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = settings.concurrency
# Survive junk pushed onto the queue, and answer undecodable jobs instead of dropping them silently.
app.conf.broker_transport = (
    "worker.transport:SentinelTransport" if current_settings().uses_sentinel else "worker.transport:Transport"
)
app.conf.worker_consumer = "worker.consumer:Consumer"
# Every state a worker stores goes through a compare-and-set that never replaces a final answer.
_backend = "SentinelResultBackend" if current_settings().uses_sentinel else "ResultBackend"
app.conf.result_backend = f"worker.results:{_backend}+{current_settings().result_backend}"
if settings.log_format == "json":
    signals.after_setup_logger.connect(logs.use_json_lines)
    signals.after_setup_task_logger.connect(logs.use_json_lines)


class ForecastTask(Task):
    """The forecast task; `runner` is the JobRunner of the model this process serves, set by the Serving step
    (worker/steps.py) once the model is loaded and cleared when it is released."""

    runner: JobRunner | None = None


# throws: a JobFailed is an expected outcome (logged without a traceback), not a worker error.
# ignore_result: the job runner stores every state itself, after claiming the job (worker/jobs.py).
@app.task(base=ForecastTask, name=FORECAST_TASK, bind=True, acks_late=True, throws=(JobFailed,), ignore_result=True)
def forecast(self, *args, **kwargs):
    """Forecast one series: args=[request] (or kwargs={"request": ...}), a schemas.ForecastRequest as JSON.

    Any other shape reaches validation as a non-object and fails there with INVALID_INPUT, instead of
    raising TypeError in Celery's call (which would look like a worker fault)."""
    if self.runner is None:
        raise JobFailed.of(ErrorCode.MODEL_NOT_READY, "the worker has no model loaded", job_id=self.request.id)
    request = args[0] if len(args) == 1 and not kwargs else kwargs.get("request") if not args else None
    return self.runner.run(self, request)


# Probes first, then the model; both before the consumer, which starts last; stopped in reverse.
app.steps["worker"].update({steps.Probes, steps.Serving})
