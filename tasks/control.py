"""Operator commands sent to running workers (Celery broadcast), without torch:

    python -m tasks.control roll --model kronos-small --revision REV [--predictor PATH_OR_REPO]
                                 [--worker NAME ...] [--wait] [--timeout S] [--json]

`roll` tells the workers of the model's queue (every one with a fresh heartbeat, or those named), one at
a time, to load REV (worker/control.py: kronos_load_model). Each worker keeps serving its old engine while
it loads the new one beside it, checks it with a smoke forecast and switches between two batches; if the
load fails it keeps the old one. Without --wait the next worker is told as soon as the previous one
accepted; with --wait (a rolling update proper) the next one is told only once the previous one serves the
new revision, and the roll stops at the first worker that could not, leaving the rest on the old revision.
Prints one line per worker (or a JSON list); exits 0 when every worker accepted (--wait: switched).
Control commands reach every worker, so only the `kronos-operator` Redis user may send them
(ops/redis_acl.py): run this with its credentials.
"""

import argparse
import json
import sys
import time

import redis
from pydantic import ValidationError

from schemas.heartbeat import HEARTBEAT_KEY, WorkerHeartbeat
from tasks.app import app
from tasks.connections import redis_client
from tasks.settings import current_settings

LOAD_COMMAND = "kronos_load_model"
STATUS_COMMAND = "kronos_model_status"
REPLY_SECONDS = 10.0  # per control reply: the commands answer at once, the load runs in the background
POLL_SECONDS = 0.5


def model_workers(client: redis.Redis, model: str, now: float) -> list[str]:
    """Workers whose fresh heartbeat says they serve `model`, by name."""
    workers = []
    for raw in client.hgetall(HEARTBEAT_KEY).values():
        try:
            heartbeat = WorkerHeartbeat.model_validate_json(raw)
        except ValidationError:  # not a worker this version can address; `python -m worker.health` names it
            continue
        if heartbeat.model == model and not heartbeat.is_stale(now):
            workers.append(heartbeat.worker)
    return sorted(workers)


def ask(app, worker: str, command: str, arguments: dict | None = None) -> dict | None:
    """One worker's reply to a control command, or None when it did not answer in time."""
    replies = app.control.broadcast(
        command, arguments=arguments or {}, destination=[worker], reply=True, timeout=REPLY_SECONDS
    )
    return next((reply[worker] for reply in replies or [] if worker in reply), None)


def wait_for_update(app, worker: str, update_id: str, timeout: float) -> dict:
    """The update's final state (serving or failed), polled from the worker, or a timeout outcome."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        status = ask(app, worker, STATUS_COMMAND) or {}
        update = status.get("update") or {}
        if update.get("id") == update_id and update.get("state") != "loading":
            return update
        time.sleep(POLL_SECONDS)
    return {"state": "timeout", "error": f"still loading after {timeout:g} s"}


def roll(app, workers: list[str], arguments: dict, wait: bool, timeout: float) -> list[dict]:
    outcomes: list[dict] = []
    for worker in workers:
        if outcomes and outcomes[-1]["state"] not in ("loading", "serving"):
            outcomes.append({"worker": worker, "state": "skipped", "error": "an earlier worker did not switch"})
            continue
        reply = ask(app, worker, LOAD_COMMAND, arguments)
        if reply is None:
            outcome = {"state": "no reply", "error": f"no answer within {REPLY_SECONDS:g} s"}
        elif wait and reply.get("state") == "loading":
            outcome = wait_for_update(app, worker, reply["id"], timeout)
        else:
            outcome = reply
        outcomes.append({"worker": worker, **outcome})
    return outcomes


def describe(outcome: dict) -> str:
    state = outcome["state"]
    if state == "serving":
        return f"{outcome['worker']}: serving {outcome['predictor']} rev {outcome['revision']}" + (
            f" (was {outcome['previous_revision']})" if outcome.get("previous_revision") else ""
        )
    if state == "loading":
        return f"{outcome['worker']}: loading {outcome['predictor']} rev {outcome['revision']} (accepted)"
    return f"{outcome['worker']}: {state}: {outcome.get('error')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.control", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rolling = commands.add_parser("roll", help="load another revision on the workers of a queue, one at a time")
    rolling.add_argument("--model", required=True, help="served model name; its queue's workers are updated")
    rolling.add_argument("--revision", help="predictor revision (a commit; default: the Hub's main)")
    rolling.add_argument("--predictor", help="another predictor checkpoint (published name, repo id, directory)")
    rolling.add_argument("--worker", action="append", help="only this worker (repeatable; default: all of the queue)")
    rolling.add_argument("--wait", action="store_true", help="wait for each worker to switch before the next")
    rolling.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per worker (--wait)")
    rolling.add_argument("--json", action="store_true", help="print the outcomes as a JSON list")
    args = parser.parse_args(argv)

    settings = current_settings()
    if args.model not in settings.models:
        parser.error(f"unknown model {args.model!r}; served models (KRONOS_MODELS): {', '.join(settings.models)}")
    workers = args.worker
    if not workers:
        with redis_client(settings.broker_url, settings) as client:
            workers = model_workers(client, args.model, time.time())
    if not workers:
        print(f"no worker of {args.model} has a fresh heartbeat", file=sys.stderr)
        return 1
    arguments = {"model": args.model, "predictor": args.predictor, "revision": args.revision}
    outcomes = roll(app, workers, arguments, args.wait, args.timeout)
    if args.json:
        print(json.dumps(outcomes, indent=2))
    else:
        for outcome in outcomes:
            print(describe(outcome))
    wanted = "serving" if args.wait else "loading"
    return 0 if all(outcome["state"] == wanted for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
