"""The dead-letter list: jobs that failed for good although another attempt might succeed.

A worker appends a job here when it fails with a code that was worth retrying (INTERNAL,
RESOURCE_EXHAUSTED, MODEL_NOT_READY) after its last retry, or with TIMEOUT. Invalid input and expired
deadlines are not kept: sending them again cannot help. Each entry keeps the job's request, so an
operator can inspect it and requeue it once the cause is fixed. A requeued job runs under a new id,
"<job id>.requeued-<epoch seconds>" (in the same producer's namespace; `requeue` prints it): the failed job's
stored FAILURE is final and stays what its producer read (docs/RELIABILITY.md).

    python -m tasks.deadletter list | show JOB_ID | requeue JOB_ID | drop JOB_ID   [--json]

The entries hold jobs' candles: `list` and `show` need the `kronos-operator` Redis user (the monitor may count
them only); `requeue` and `drop` write to a producer's queue and to the list, which the workers' user may.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery import Celery

from schemas import ErrorCode, JobError
from tasks.routing import FORECAST_TASK

DEAD_LETTER_KEY = "kronos:dead-letter"  # a list in the broker's DB, newest first
MAX_ENTRIES = 10_000  # the oldest fall off: an unattended list must not fill Redis
KEPT_CODES = frozenset({ErrorCode.INTERNAL, ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.MODEL_NOT_READY, ErrorCode.TIMEOUT})


@dataclass(frozen=True)
class DeadLetter:
    job_id: str
    queue: str | None
    error: dict[str, Any]
    payload: Any
    retries: int
    worker: str | None
    failed_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def should_keep(error: JobError) -> bool:
    return error.code in KEPT_CODES


def record(client: redis.Redis, letter: DeadLetter) -> None:
    with client.pipeline() as pipe:
        pipe.lpush(DEAD_LETTER_KEY, letter.to_json())
        pipe.ltrim(DEAD_LETTER_KEY, 0, MAX_ENTRIES - 1)
        pipe.execute()


def entries(client: redis.Redis) -> list[tuple[str, DeadLetter]]:
    """(raw entry, parsed) newest first; the raw text is what LREM needs to remove it."""
    return [(raw, DeadLetter(**json.loads(raw))) for raw in client.lrange(DEAD_LETTER_KEY, 0, -1)]


def find(client: redis.Redis, job_id: str) -> tuple[str, DeadLetter]:
    for raw, letter in entries(client):
        if letter.job_id == job_id:
            return raw, letter
    raise KeyError(f"no dead letter for job {job_id}")


def drop(client: redis.Redis, job_id: str) -> DeadLetter:
    raw, letter = find(client, job_id)
    client.lrem(DEAD_LETTER_KEY, 1, raw)
    return letter


def requeue(client: redis.Redis, app: Celery, job_id: str) -> str:
    """Send the job's request again under a new id (a failed job's answer is final), then forget the letter;
    returns the new id."""
    raw, letter = find(client, job_id)
    new_id = f"{letter.job_id}.requeued-{int(time.time())}"
    app.send_task(FORECAST_TASK, args=[letter.payload], task_id=new_id, queue=letter.queue)
    client.lrem(DEAD_LETTER_KEY, 1, raw)
    return new_id


def main(argv: list[str] | None = None) -> int:
    from tasks.app import app
    from tasks.connections import redis_client
    from tasks.settings import current_settings

    parser = argparse.ArgumentParser(prog="python -m tasks.deadletter", description="Inspect and requeue dead letters.")
    parser.add_argument("action", choices=["list", "show", "requeue", "drop"])
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.action != "list" and not args.job_id:
        parser.error(f"{args.action} needs a JOB_ID")
    client = redis_client(app.conf.broker_url, current_settings(), decode_responses=True)
    try:
        if args.action == "list":
            letters = [letter for _, letter in entries(client)]
            if args.json:
                print(json.dumps([asdict(letter) for letter in letters]))
            for letter in [] if args.json else letters:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.failed_at))
                print(f"{letter.job_id}  {when}  {letter.error['code']}  {letter.error['message']}")
            return 0
        if args.action == "requeue":
            new_id = requeue(client, app, args.job_id)
            print(json.dumps({"job_id": args.job_id, "requeued_as": new_id}) if args.json else f"requeued as: {new_id}")
            return 0
        action = {"show": lambda: find(client, args.job_id)[1], "drop": lambda: drop(client, args.job_id)}
        letter = action[args.action]()
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(letter)) if args.json or args.action == "show" else f"{args.action}: {letter.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
