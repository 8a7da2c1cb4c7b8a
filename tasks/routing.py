"""Queues and routes: one queue per served model, so each worker consumes only the model it has loaded.

Producers send FORECAST_TASK by name, naming the model either as the `model` keyword argument or as the
"model" key of a job document passed as the first positional argument:

    app.send_task(FORECAST_TASK, kwargs={"model": "kronos-base", ...}, priority=2)
    app.send_task(FORECAST_TASK, args=[request.model_dump(mode="json")])

ForecastRouter puts it on queue_for_model(model); a job naming no model goes to KRONOS_DEFAULT_MODEL's queue.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from kombu import Exchange, Queue

from tasks.settings import KronosSettings, current_settings

FORECAST_TASK = "kronos.forecast"
MODEL_ARGUMENT = "model"

# On Redis every step is a separate list per queue and 0 is served first (the reverse of RabbitMQ).
# All ten steps, so a priority a producer sets is never rounded to a neighbour.
PRIORITY_STEPS = tuple(range(10))
# kombu treats a message without priority as 0, the most urgent; the router gives forecasts a middle
# priority instead, so urgent jobs (0-4) can overtake routine ones and backfills (6-9) yield to both.
DEFAULT_PRIORITY = 5


def queue_for_model(model: str, settings: KronosSettings | None = None) -> str:
    """The queue name for a served model, e.g. "kronos.kronos-small"; ValueError for any other model."""
    settings = settings or current_settings()
    if model not in settings.models:
        raise ValueError(f"unknown model {model!r}; served models (KRONOS_MODELS): {', '.join(settings.models)}")
    return f"{settings.queue_prefix}.{model}"


def forecast_queues(settings: KronosSettings | None = None) -> tuple[Queue, ...]:
    """One kombu Queue per served model (Redis has no x-max-priority: see PRIORITY_STEPS instead)."""
    settings = settings or current_settings()
    names = [queue_for_model(model, settings) for model in settings.models]
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names)


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
        if name != FORECAST_TASK:
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
