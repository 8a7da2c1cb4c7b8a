"""Celery settings shared by producers, workers and Flower, built from KRONOS_* variables.

Loaded by name from tasks/app.py. Celery reads this module's settings as attributes when an app's configuration
is first needed, not at import: they are built then from current_settings(), so that a bad variable stops the
command that needed them with one line naming it, and importing this module or the app never fails.

Every process must load the same values: each one that consumes from Redis also sweeps unacknowledged messages
back into the queues, and the shortest visibility timeout wins.
Variables: docs/CONFIGURATION.md. No torch and no worker/model imports here: producers import this.
"""

from functools import cache
from typing import Any

from tasks import routing
from tasks.connections import sentinel_transport_options, ssl_options
from tasks.replication import replication_options
from tasks.settings import KronosSettings, current_settings


def celery_settings(settings: KronosSettings) -> dict[str, Any]:
    """Celery's settings for a deployment's KRONOS_* settings (each local variable below is one)."""
    broker_url = settings.broker_url
    result_backend = settings.result_backend
    # rediss:// URLs: verify the server (kombu alone would accept any certificate) and present our client certificate.
    broker_use_ssl = ssl_options(settings, broker_url)
    redis_backend_use_ssl = ssl_options(settings, result_backend)

    # JSON only: a pickle payload from anyone able to write to Redis would run code inside the worker.
    task_serializer = "json"
    result_serializer = "json"
    accept_content = ["json"]
    result_accept_content = ["json"]

    # Ack after the result is stored, so a worker that dies mid-job leaves the job to be run again.
    task_acks_late = True
    # A job that raised or hit its time limit would do the same again: store FAILURE and ack, never loop.
    task_acks_on_failure = True
    task_acks_on_timeout = True
    # A pool child killed mid-job (OOM, segfault) gets the job sent again as a retry, so the task's
    # max_retries bounds a job that kills every process it lands on; rejecting (requeue) is the fallback.
    task_reject_on_worker_lost = True
    task_retry_on_worker_lost = True
    # Prefork pools kill a job that runs past this, before its visibility timeout could hand it to a second
    # worker (thread pools ignore time limits: they must enforce the deadline themselves).
    task_time_limit = settings.max_job_seconds

    # The visibility clock starts at fetch: every prefetched job waits its turn on that clock.
    worker_prefetch_multiplier = settings.prefetch_multiplier
    # On a lost broker connection the worker requeues everything it holds, running jobs included; cancel
    # those rather than let them finish alongside their second copy.
    worker_cancel_long_running_tasks_on_connection_loss = True
    # (No worker_deduplicate_successful_tasks: it acts only on messages flagged as redelivered, which a restored
    # message is not. Every delivery of a forecast first claims its job, and one whose final answer is stored is
    # acknowledged without running: worker/claims.py.)

    # STARTED state and task events, so clients and Flower can tell queued from running. (The forecast task stores
    # its states itself, STARTED included, once it holds the job's claim: worker/jobs.py.)
    task_track_started = True
    task_send_sent_event = True
    worker_send_task_events = True

    result_expires = settings.result_expires
    # No copy of the request's arguments in results (the candles would be readable wherever results are): the
    # worker's backend names the task, its queue, the worker and the retry count instead (worker/results.py).
    result_extended = False
    # Backend calls of producers and Flower retry through a short Redis outage: up to 10 retries, each pause a
    # random part (full jitter) of 0.2 s doubling up to 2 s: at most 15 s in all, about half that on average.
    # The worker's own writes do not use this: a final answer is retried until the job's visibility timeout
    # runs out, other states are never waited on (worker/results.py).
    result_backend_always_retry = True
    result_backend_max_retries = 10
    result_backend_base_sleep_between_retries_ms = 100
    result_backend_max_sleep_between_retries_ms = 2000
    # Each backend operation's own reconnect loop (default 20 tries a second apart): a producer whose first send
    # finds Redis down fails after about 5 s instead of 20.
    result_backend_transport_options = {
        "retry_policy": {"max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
        # sentinel:// URLs: the master's name and how to reach the sentinels (nothing for redis://)
        **sentinel_transport_options(settings),
    }

    broker_connection_retry_on_startup = True
    broker_transport_options = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.unacked_restore_interval,
        # kombu sweeps only on every Nth interval (default 10); 1 makes the interval the actual sweep period.
        "unacked_restore_throttle": 1,
        "priority_steps": list(routing.PRIORITY_STEPS),
        # A worker serving several producers' queues takes turns between them (worker/transport.py: fairness).
        "queue_order_strategy": "round_robin",
        # Without a socket timeout a command on a half-open connection (failover, NAT drop) waits forever.
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": settings.health_check_interval,
        **sentinel_transport_options(settings),
        # every publish of a job waits for this many replicas (tasks/replication.py)
        **replication_options(settings.replicas_to_ack, settings.replica_ack_timeout),
    }
    # The Redis result backend takes its socket options from these redis_* settings, not from
    # result_backend_transport_options.
    redis_socket_timeout = settings.socket_timeout
    redis_socket_connect_timeout = settings.socket_connect_timeout
    redis_socket_keepalive = True
    redis_backend_health_check_interval = settings.health_check_interval

    task_queues = routing.forecast_queues(settings)
    task_routes = (routing.ForecastRouter(settings),)
    task_default_queue = routing.default_queue(settings)
    # A queue name that is not a served model's raises at send time instead of filling a queue nobody reads.
    task_create_missing_queues = False
    return {name: value for name, value in locals().items() if name != "settings"}


# One set of Celery settings (queues, router) per deployment's settings, however many names Celery looks up.
_celery_settings_of = cache(celery_settings)


def __getattr__(name: str) -> Any:
    # Celery looks this module's settings up by name (and lists them with dir()) once an app is configured.
    try:
        return _celery_settings_of(current_settings())[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return [*globals(), *_celery_settings_of(current_settings())]
