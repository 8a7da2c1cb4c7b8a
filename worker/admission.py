"""Which messages a worker takes from a forecast queue: the check between the Redis pop and Celery.

Celery acts on a message's headers before any task code runs, and on what it carries after: it stores
STARTED under the message's task id (task_track_started), runs the built-in tasks a message may name
(celery.chain, celery.group, ... which publish further messages with the worker's own Redis rights), and
sends the follow-up work a message carries (link, link_error, chain, chord) when the task ends. A producer
can write any of these. So a message is refused here unless it is a forecast, carries no follow-up work,
is not delayed past the visibility timeout (the worker would hold it in memory until then, and Redis would
hand it to a second worker meanwhile), and, on a producer's queue, its task id is in that producer's
namespace: the producer's ACL user reads only "celery-task-meta-<producer>:*", and without this check it
could have a worker overwrite another producer's results.

A refused message is never deserialized beyond JSON, never run, and nothing is stored under its task id.
"""

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta

from tasks.routing import FORECAST_TASK, job_id_prefix

FOLLOW_UP_OPTIONS = ("callbacks", "errbacks", "chain", "chord")
JSON_CONTENT_TYPE = "application/json"


def refusal(message: dict, producer: str | None, max_delay_seconds: float) -> str | None:
    """Why `message` (a kombu envelope popped from `producer`'s queue) must not reach Celery, or None."""
    headers = message.get("headers") or {}
    task = headers.get("task")
    if task != FORECAST_TASK:
        # Celery's protocol 1 put the task in the body: such messages have no "task" header and are refused.
        return f"task {task!r} is not {FORECAST_TASK}"
    task_id = headers.get("id")
    prefix = job_id_prefix(producer)
    if not isinstance(task_id, str) or not task_id.startswith(prefix) or len(task_id) == len(prefix):
        return f"task id {task_id!r} is outside producer {producer}'s namespace {prefix}*"
    for name in ("group", "chord"):
        if headers.get(name):
            return f"the {name!r} header asks for follow-up work"
    delayed = _delay_refusal(headers.get("eta"), max_delay_seconds)
    if delayed:
        return delayed
    embed = _embedded_options(message)
    follow_ups = [name for name in FOLLOW_UP_OPTIONS if embed.get(name)]
    if follow_ups:
        return f"the message carries follow-up work ({', '.join(follow_ups)})"
    return None


def _delay_refusal(eta, max_delay_seconds: float) -> str | None:
    if eta is None:
        return None
    try:
        when = datetime.fromisoformat(eta)
    except (TypeError, ValueError):
        return f"eta {eta!r} is not an ISO 8601 time"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when > datetime.now(UTC) + timedelta(seconds=max_delay_seconds):
        return f"eta {eta} is more than the visibility timeout ({max_delay_seconds:g} s) ahead"
    return None


def _embedded_options(message: dict) -> dict:
    """The third element of a protocol 2 JSON body ([args, kwargs, embed]); {} for anything else.

    Bodies in other content types are left alone: Celery refuses them undecoded (accept_content) and
    worker/consumer.py answers the job with INVALID_INPUT."""
    if message.get("content-type") != JSON_CONTENT_TYPE:
        return {}
    body = message.get("body", "")
    try:
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        decoded = json.loads(body)
    except (binascii.Error, ValueError, TypeError):
        return {}
    if isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[2], dict):
        return decoded[2]
    return {}
