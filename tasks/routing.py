"""Queues and routes: one queue per served model, so each worker consumes only the model it has loaded.

Producers send FORECAST_TASK by name, naming the model either as the `model` keyword argument or as the
"model" key of a job document passed as the first positional argument:

    app.send_task(FORECAST_TASK, kwargs={"model": "kronos-base", ...}, priority=2)
    app.send_task(FORECAST_TASK, args=[request.model_dump(mode="json")])

ForecastRouter puts it on queue_for_model(model); a job naming no model goes to KRONOS_DEFAULT_MODEL's queue.

Producer identities. A deployment that lists its producers (KRONOS_PRODUCERS) gives each its own queue per
model, "<prefix>.<model>.<producer>", which only that producer's Redis ACL user may push to (ops/redis_acl.py).
A worker consumes every producer's queue of its model, round-robin, and takes a job's producer from the queue
the job was popped from: the one identity a producer cannot forge. A producer process names itself with
KRONOS_PRODUCER. Without KRONOS_PRODUCERS there is one shared queue per model, "<prefix>.<model>", and no
identities (a trusted network: SECURITY.md).
"""

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import uuid4

from kombu import Exchange, Queue

from tasks.settings import KronosSettings, current_settings

FORECAST_TASK = "kronos.forecast"
MODEL_ARGUMENT = "model"

# On Redis every step is a separate list per queue (kombu's). All ten steps, so a priority a producer sets is
# never rounded to a neighbour.
PRIORITY_STEPS = tuple(range(10))
# One scale for every client: 1 is served first, 9 last, 5 is the default. kombu files a message sent without
# a priority (every stock client's, celery-node's, `celery call`'s) or with 0 in the queue's bare list, which it
# would serve before everything else; workers serve that list with 5's instead (worker/transport.py), so a job
# sent without a priority is a default job whoever sent it, urgent jobs (1-4) overtake it and backfills (6-9)
# yield to it.
DEFAULT_PRIORITY = 5
CONSUMPTION_ORDER = (1, 2, 3, 4, 0, 5, 6, 7, 8, 9)


def queue_for_model(model: str, settings: KronosSettings | None = None, producer: str | None = None) -> str:
    """The queue a producer's jobs for a served model go to: "kronos.kronos-small" (shared queues) or
    "kronos.kronos-small.<producer>"; `producer` defaults to KRONOS_PRODUCER. ValueError for another model."""
    settings = settings or current_settings()
    if model not in settings.models:
        raise ValueError(f"unknown model {model!r}; served models (KRONOS_MODELS): {', '.join(settings.models)}")
    producer = producer or settings.producer
    if producer is None:
        if settings.producers:
            raise ValueError(
                "KRONOS_PRODUCERS is set, so every job belongs to a producer: set KRONOS_PRODUCER to this one's name"
            )
        return f"{settings.queue_prefix}.{model}"
    return f"{settings.queue_prefix}.{model}.{producer}"


def serving_queues(model: str, settings: KronosSettings | None = None) -> dict[str, str | None]:
    """The queues a worker of `model` consumes, each with the producer whose jobs it holds (None: shared)."""
    settings = settings or current_settings()
    if not settings.producers:
        return {queue_for_model(model, settings): None}
    return {queue_for_model(model, settings, producer): producer for producer in settings.producers}


def job_id_prefix(producer: str | None) -> str:
    """What every job id of a producer starts with: its result keys are "celery-task-meta-<producer>:*"."""
    return f"{producer}:" if producer else ""


def producer_job_id(job_id: str | None, producer: str | None) -> str:
    """A job id in the producer's namespace: `job_id` (a new UUID when None) with the producer's prefix,
    unless it has it already, so that a caller may use its ids with or without the prefix."""
    prefix = job_id_prefix(producer)
    job_id = job_id or str(uuid4())
    return job_id if job_id.startswith(prefix) else prefix + job_id


def forecast_queues(settings: KronosSettings | None = None) -> tuple[Queue, ...]:
    """The kombu Queues this process may use: the producer's own (KRONOS_PRODUCER) and, for a worker, every
    listed producer's, per served model (Redis has no x-max-priority: see PRIORITY_STEPS instead).

    A producer process never declares them: declaring writes the queue's binding, which decides where a job
    requeued from the unacked records goes, so only the workers, which declare the queues they consume, may
    write bindings (ops/redis_acl.py). A producer's job goes straight onto its queue's list (Celery sends
    to a direct queue through the nameless exchange), so it waits there even if no worker has ever run."""
    settings = settings or current_settings()
    names: dict[str, None] = {}
    for model in settings.models:
        if settings.producer:
            names[queue_for_model(model, settings)] = None
        if settings.producers or not settings.producer:
            names.update(dict.fromkeys(serving_queues(model, settings)))
    producer = settings.producer is not None
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name, no_declare=producer) for name in names)


def default_queue(settings: KronosSettings) -> str:
    """Celery's task_default_queue: the default model's queue of this producer, or of the first one listed."""
    producer = settings.producer or (settings.producers[0] if settings.producers else None)
    return queue_for_model(settings.default_model, settings, producer)


class ForecastRouter:
    """A Celery router (task_routes entry) sending each forecast to its model's queue.

    Options the producer passes (queue=..., priority=...) take precedence over what this returns.
    """

    def __init__(self, settings: KronosSettings) -> None:
        self.settings = settings

    def __call__(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        if name != FORECAST_TASK or options.get("queue") or options.get("routing_key"):
            # a destination given (a worker's retry goes back to the queue it came from): it wins anyway
            return None
        model = model_of_job(args or (), kwargs or {}) or self.settings.default_model
        return {"queue": queue_for_model(model, self.settings), "priority": DEFAULT_PRIORITY}


def model_of_job(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The model a forecast job names (see the module docstring), or None."""
    if MODEL_ARGUMENT in kwargs:
        return kwargs[MODEL_ARGUMENT]
    if args and isinstance(args[0], Mapping):
        return args[0].get(MODEL_ARGUMENT)
    return None
