"""What a worker takes from a forecast queue: the raw item is checked and a fresh message built from it.

Celery acts on a message's headers before any task code runs, and on what it carries after: it stores
states under the message's task id, runs the built-in tasks a message may name (celery.chain, celery.group,
... which publish further messages with the worker's own Redis rights), sends the follow-up work a message
carries (link, link_error, chain, chord), holds a message with an eta in memory until then, and reads all of
these from the headers or from the body (a body that is a JSON object is "protocol 1": kombu decodes it
however it can). A producer can write any of it. So nothing a producer wrote reaches Celery: `admit` reads
the raw item under an allow-list of the protocol 2 envelope and hands on a message it builds itself from
the fields a forecast needs. Anything else is refused with its reason (the transport keeps it in the
poison list), so no item can run, crash or stall a worker:

- the raw item is at most `max_message_bytes` (checked again by the pop script before Redis decodes it);
- the envelope is strict JSON (no NaN or Infinity), nested at most a few levels, with exactly the keys of a
  kombu message; properties and headers are each from a fixed list, with types and bounds;
- the task is the forecast, its id a job id in the producer's namespace (a producer's ACL user reads only
  "celery-task-meta-<producer>:*": without this it could have a worker write another producer's results);
- no follow-up work anywhere (group, chord, callbacks, errbacks, chain), an eta or expiry within the
  visibility timeout;
- the body is strict base64 of strict-enough JSON (the request may hold NaN: validation answers it with
  INVALID_INPUT), exactly [args, kwargs, embed] holding one request.

The request itself is checked by the task (schemas.validate_job): a message that passes here but whose
request is invalid ends as INVALID_INPUT under its id.
"""

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.request import JOB_ID_PATTERN
from tasks.producer import SENT_AT_HEADER
from tasks.routing import FORECAST_TASK, job_id_prefix

# An envelope nests 3 levels (properties.delivery_info); a request 3 (candles.close[i]) under [args, ...].
MAX_ENVELOPE_DEPTH = 4
MAX_BODY_DEPTH = 6
MAX_TEXT = 256  # ids, names, tags
MAX_REPR = 4096  # argsrepr / kwargsrepr
JSON_CONTENT_TYPE = "application/json"
FOLLOW_UP_OPTIONS = ("callbacks", "errbacks", "chain", "chord")


def max_message_bytes(max_payload_bytes: int) -> int:
    """The largest item a queue may hold: twice KRONOS_MAX_PAYLOAD_BYTES (a request base64-encoded in its body
    is 4/3 of it; up to twice, a request somewhat over its limit still reaches validation and is answered
    INVALID_INPUT, naming the limit) and 64 KiB of envelope. A larger item is never decoded, nor answered."""
    return 2 * max_payload_bytes + 64 * 1024


class Refused(Exception):
    """Why an item must not reach Celery; `job_id` when the item names a job in its producer's namespace."""

    def __init__(self, reason: str, job_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


@dataclass(frozen=True)
class Gate:
    """What admission needs to know about the queue an item came from."""

    producer: str | None  # whose queue it is; None: a shared queue, no namespaces
    max_message_bytes: int
    max_delay_seconds: float  # eta / expiry: at most this far ahead (the visibility timeout)
    max_retries: int


def admit(raw: bytes | str, queue: str, priority: int, gate: Gate) -> dict:
    """The canonical message for the forecast in `raw`, popped from `queue`'s list of `priority`; or Refused."""
    if len(raw) > gate.max_message_bytes:
        raise Refused(f"the message is {len(raw)} bytes, more than the limit of {gate.max_message_bytes}")
    envelope = _strict_json(raw, MAX_ENVELOPE_DEPTH, "the message")
    _require(isinstance(envelope, dict), "the message is not a JSON object")
    properties, headers = envelope.get("properties"), envelope.get("headers")
    _require(isinstance(properties, dict), "properties is not an object")
    _require(isinstance(headers, dict), "headers is not an object")
    task, job_id = headers.get("task"), headers.get("id")
    _require(task == FORECAST_TASK, f"task {_shown(task)} is not {FORECAST_TASK}")
    _require(isinstance(job_id, str) and len(job_id) <= 128 and re.fullmatch(JOB_ID_PATTERN, job_id) is not None,
             f"task id {_shown(job_id)} is not a job id ({JOB_ID_PATTERN}, at most 128 characters)")  # fmt: skip
    prefix = job_id_prefix(gate.producer)
    _require(job_id.startswith(prefix) and len(job_id) > len(prefix),
             f"task id {job_id!r} is outside producer {gate.producer}'s namespace {prefix}*")  # fmt: skip
    # From here the refusal is about this producer's own job: it is answered under its id.
    try:
        return _canonical(envelope, properties, headers, job_id, queue, priority, gate)
    except Refused as refused:
        raise Refused(refused.reason, job_id) from None


def _canonical(envelope, properties, headers, job_id, queue, priority, gate) -> dict:
    _only_keys(envelope, ENVELOPE_KEYS, "the message")
    _require(isinstance(envelope.get("redelivered", False), bool), "the message's redelivered flag is not a boolean")
    _require(envelope.get("content-type") == JSON_CONTENT_TYPE, "the content type is not application/json")
    _require(envelope.get("content-encoding", "utf-8") == "utf-8", "the content encoding is not utf-8")
    _only_keys(properties, PROPERTIES, "properties")
    _only_keys(headers, HEADERS, "headers")
    for name, check in PROPERTIES.items():
        _require(check(properties.get(name)), f"properties.{name} is not allowed as {_shown(properties.get(name))}")
    for name, check in HEADERS.items():
        _require(check(headers.get(name)), f"headers.{name} is not allowed as {_shown(headers.get(name))}")
    retries = headers.get("retries") or 0
    _require(retries <= gate.max_retries, f"headers.retries {retries} is more than KRONOS_MAX_RETRIES")
    eta = _time_within(headers.get("eta"), "eta", gate.max_delay_seconds)
    expires = _time_within(headers.get("expires"), "expires", None)
    request = _one_request(envelope.get("body"))
    sent_at = headers.get(SENT_AT_HEADER)
    if sent_at is not None and not 0 <= sent_at <= time.time() + 86400:
        sent_at = None  # a clock this far off says nothing about the job's queue wait
    body = json.dumps([[request], {}, dict.fromkeys(FOLLOW_UP_OPTIONS)])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": JSON_CONTENT_TYPE,
        "headers": {
            "lang": "py",
            "task": FORECAST_TASK,
            "id": job_id,
            "shadow": None,
            "eta": eta,
            "expires": expires,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            # what Flower's ARGS column shows (flowerconfig.py), the same for every client, never the candles
            "argsrepr": repr([{key: request[key] for key in ("series_id", "model", "pred_len") if key in request}]),
            "kwargsrepr": "{}",
            "origin": headers.get("origin") if isinstance(headers.get("origin"), str) else None,
            # the task stores every state itself, once it holds the job's claim (worker/jobs.py)
            "ignore_result": True,
            SENT_AT_HEADER: sent_at,
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": None,
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": properties["delivery_tag"],
        },
    }


def _one_request(body) -> dict:
    """The request of a protocol 2 body: base64 of [[request], {}, embed] or [[], {"request": ...}, embed],
    with no follow-up work in embed."""
    _require(isinstance(body, str), "the body is not a string")
    try:
        decoded = base64.b64decode(body, validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise Refused(f"the body is not strict base64 of UTF-8 text ({exc})") from None
    # NaN stays readable here: the request's validation answers it with INVALID_INPUT, naming the field.
    document = _strict_json(decoded, MAX_BODY_DEPTH, "the body", allow_nan=True)
    _require(isinstance(document, list) and len(document) == 3, "the body is not [args, kwargs, embed]")
    args, kwargs, embed = document
    _require(isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict),
             "the body is not [args, kwargs, embed] of an array and two objects")  # fmt: skip
    _only_keys(embed, FOLLOW_UP_OPTIONS, "the body's options")
    follow_ups = [name for name in FOLLOW_UP_OPTIONS if embed.get(name)]
    _require(not follow_ups, f"the message carries follow-up work ({', '.join(follow_ups)})")
    if len(args) == 1 and not kwargs:
        request = args[0]
    elif not args and list(kwargs) == ["request"]:
        request = kwargs["request"]
    else:
        raise Refused("the body does not hold exactly one request (args [request], or kwargs {request})")
    _require(isinstance(request, dict), "the request is not a JSON object")
    return request


def _strict_json(text: bytes | str, max_depth: int, what: str, allow_nan: bool = False) -> Any:
    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        document = json.loads(
            text,
            parse_constant=None if allow_nan else no_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise Refused(f"{what} is not strict JSON ({_shown(str(exc))})") from None
    _require(_depth(document) <= max_depth, f"{what} nests deeper than {max_depth} levels")
    return document


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # Two decoders (the pop script's and this one) must never read two different messages from one item.
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("an object repeats a key")
    return document


def _depth(document: Any) -> int:
    deepest, level = 0, [document]
    while level:
        deepest += 1
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
    return deepest


def _time_within(value, name: str, max_ahead: float | None) -> str | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise Refused(f"headers.{name} {_shown(value)} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if max_ahead is not None and when.timestamp() > time.time() + max_ahead:
        raise Refused(f"headers.{name} {value} is more than the visibility timeout ({max_ahead:g} s) ahead")
    return when.isoformat()


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Refused(reason)


def _only_keys(document: dict, allowed, what: str) -> None:
    unknown = sorted(set(document) - set(allowed))
    _require(not unknown, f"{what} has fields a forecast does not use: {', '.join(map(_shown, unknown[:5]))}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_text(value, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _whole(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _empty(value) -> bool:
    return value in (None, [], {}, "")


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _small_route(value) -> bool:
    # kombu adds "redelivered" to a message it restores (and "priority" to what it delivers)
    return (
        isinstance(value, dict)
        and set(value) <= {"exchange", "routing_key", "redelivered", "priority"}
        and all(
            isinstance(value.get(key, ""), str) and len(value.get(key, "")) <= MAX_TEXT
            for key in ("exchange", "routing_key")
        )
        and isinstance(value.get("redelivered", False), bool)
        and _optional(_whole(0, 255))(value.get("priority"))
    )


def _time_limits(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(part is None or _finite(part) for part in value)


# kombu's restore may add "redelivered" at the top, in headers and in delivery_info: a restored job is the same job
ENVELOPE_KEYS = ("body", "content-encoding", "content-type", "headers", "properties", "redelivered")
# kombu's and celery-node's (camelCase) properties; delivery_info is replaced by the queue actually popped.
PROPERTIES: dict[str, Callable[[Any], bool]] = {
    "correlation_id": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "correlationId": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "reply_to": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "replyTo": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "delivery_mode": _optional(_whole(1, 2)),
    "delivery_info": _optional(_small_route),
    "priority": _optional(_whole(0, 255)),
    "origin": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "redelivered": _optional(lambda value: isinstance(value, bool)),
    "body_encoding": lambda value: value == "base64",
    "delivery_tag": _is_text,
}
# Celery's protocol 2 headers (5.x) and ours; each read only as far as a forecast needs it.
HEADERS: dict[str, Callable[[Any], bool]] = {
    "lang": _optional(lambda value: isinstance(value, str) and len(value) <= 16),
    "task": _is_text,
    "id": _is_text,
    "shadow": _empty,
    "eta": _optional(lambda value: isinstance(value, str) and len(value) <= 64),
    "expires": _optional(lambda value: isinstance(value, str) and len(value) <= 64),
    "group": _empty,
    "group_index": _empty,
    "chord": _empty,
    "retries": _optional(_whole(0, 1000)),
    "timelimit": _optional(_time_limits),
    "root_id": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "parent_id": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "argsrepr": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_REPR),
    "kwargsrepr": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_REPR),
    "origin": _optional(lambda value: isinstance(value, str) and len(value) <= MAX_TEXT),
    "ignore_result": _optional(lambda value: isinstance(value, bool)),
    "replaced_task_nesting": _optional(_whole(0, 0)),
    "stamped_headers": _empty,
    "stamps": _empty,
    "redelivered": _optional(lambda value: isinstance(value, bool)),
    SENT_AT_HEADER: _optional(_finite),
}
