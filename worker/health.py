"""Is a worker taking jobs? Its readiness, its heartbeat in Redis, and the health check command.

Each worker process publishes a WorkerHeartbeat (schemas/heartbeat.py) every KRONOS_HEARTBEAT_INTERVAL
seconds as its field of the Redis hash HEARTBEAT_KEY (broker DB), and deletes the field when it shuts down.
It is ready when its model is loaded, its consumer has started and Redis answered its last ping.

    python -m worker.health [--worker NAME] [--model M]

exits 0 when every selected worker (default: every worker named `*@<this host>`) has a fresh heartbeat that
says ready; otherwise it prints one line saying why not and exits 1. It is the container's HEALTHCHECK, so
it imports neither torch nor the worker's Celery app, and starts in well under a second.
"""

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import redis
from pydantic import ValidationError

from schemas.heartbeat import HEARTBEAT_KEY, WorkerHeartbeat
from tasks.connections import redis_client
from tasks.settings import KronosSettings, SettingsError, current_settings

if TYPE_CHECKING:
    from worker.lifecycle import ServingModel  # at run time it would load torch into the health check

log = logging.getLogger(__name__)
CHECK_TIMEOUT_SECONDS = 5.0  # per Redis call of the health check, well inside Docker's 30 s default


def broker_client(settings: KronosSettings, timeout: float | None = None) -> redis.Redis:
    """A redis-py client on the broker's DB, with the deployment's socket timeouts unless `timeout` is given."""
    return redis_client(
        settings.broker_url,
        settings,
        socket_timeout=timeout or settings.socket_timeout,
        socket_connect_timeout=timeout or settings.socket_connect_timeout,
        health_check_interval=settings.health_check_interval,
    )


class Readiness:
    """What this process knows about itself; `reason()` is None when it takes jobs."""

    def __init__(self) -> None:
        self.model_loaded = False
        self.consuming = False
        self.broker_reachable = False
        self.shutting_down = False
        self.circuit_open: str | None = None  # the circuit breaker's cause while it keeps the worker off jobs

    def reason(self) -> str | None:
        if self.shutting_down:
            return "shutting down"
        if self.circuit_open is not None:
            return self.circuit_open
        if not self.model_loaded:
            return "model not loaded yet"
        if not self.consuming:
            return "consumer not started yet"
        if not self.broker_reachable:
            return "Redis did not answer the last ping"
        return None


class Heartbeat:
    """Publishes this process's WorkerHeartbeat from a daemon thread; `stop()` deletes it."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        worker: str,
        queues: Sequence[str],
        model: str,
        interval: float,
        readiness: Readiness,
        job_counts: Callable[[], tuple[int, int]],
    ):
        self.client = client
        self.worker = worker
        self.queues = list(queues)
        self.model = model
        self.interval = interval
        self.readiness = readiness
        self.job_counts = job_counts  # (in flight, done)
        self.started_at = time.time()
        self._model_fields: dict = {}
        # Fields beyond WorkerHeartbeat's (readers ignore unknown ones), e.g. the last model update.
        self._extra_fields: dict = {}
        self._lock = threading.Lock()  # beats come from the thread and from lifecycle signals
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kronos-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def model_loaded(self, serving: "ServingModel") -> None:
        info = serving.engine.info
        self._model_fields = {
            "model_id": info.predictor,
            "model_revision": info.predictor_revision,
            "tokenizer_id": info.tokenizer,
            "tokenizer_revision": info.tokenizer_revision,
            "device": serving.device,
            "synthetic_model": serving.synthetic,
            "precision": info.precision,  # float32, or the opt-in lower precision whose results differ
            "decode_path": info.decode_path,  # compiled, or eager with the reason
        }
        self.readiness.model_loaded = True
        self.beat()

    def report(self, field: str, value) -> None:
        """Publish `field` (any JSON value) in every heartbeat from now on, starting with one at once."""
        self._extra_fields[field] = value
        self.beat()

    def consumer_started(self) -> None:
        self.readiness.consuming = True
        self.beat()

    def shutting_down(self) -> None:
        """Say not ready at once, while running jobs finish (warm shutdown)."""
        self.readiness.shutting_down = True
        self.beat()

    def beat(self) -> None:
        """Ping Redis, then publish the heartbeat (at once, besides every interval)."""
        with self._lock:
            try:
                self.client.ping()
                self.readiness.broker_reachable = True
                fields = {**self._heartbeat().model_dump(mode="json"), **self._extra_fields}
                self.client.hset(HEARTBEAT_KEY, self.worker, json.dumps(fields))
            except redis.RedisError as exc:
                self.readiness.broker_reachable = False
                if not self._failing:  # once per outage, not every interval
                    log.warning("heartbeat not published: %r", exc)
                self._failing = True
                return
            if self._failing:
                log.info("heartbeat published again")
            self._failing = False

    def stop(self, timeout: float = 5) -> None:
        """End the thread and delete this worker's field, so that no reader waits for it to go stale."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            try:
                self.client.hdel(HEARTBEAT_KEY, self.worker)
            except redis.RedisError as exc:
                log.warning("heartbeat not deleted (it will go stale): %r", exc)

    def _heartbeat(self) -> WorkerHeartbeat:
        in_flight, done = self.job_counts()
        reason = self.readiness.reason()
        return WorkerHeartbeat(
            worker=self.worker,
            queue=self.queues[0],
            queues=self.queues,
            model=self.model,
            **self._model_fields,
            ready=reason is None,
            reason=reason,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            interval=self.interval,
            jobs_in_flight=in_flight,
            jobs_done=done,
        )

    def _run(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval):
            self.beat()


def assess(
    fields: Mapping[bytes, bytes], *, worker: str | None, model: str | None, host: str, now: float
) -> tuple[bool, str]:
    """(healthy, one line saying why or why not) for the heartbeats of the selected workers."""
    problems = []
    selected: dict[str, WorkerHeartbeat] = {}
    for raw_name, raw_value in fields.items():
        name = raw_name.decode(errors="replace")
        wanted = name == worker if worker else name.endswith(f"@{host}")
        if not wanted:
            continue
        try:
            heartbeat = WorkerHeartbeat.model_validate_json(raw_value)
        except ValidationError:
            problems.append(f"{name}: unreadable heartbeat")
            continue
        if model is None or heartbeat.model == model:
            selected[name] = heartbeat
    if not selected and not problems:
        scope = worker or f"*@{host}"
        return False, f"no heartbeat of {scope}{f' serving {model}' if model else ''} in Redis hash {HEARTBEAT_KEY}"
    for name, heartbeat in sorted(selected.items()):
        if heartbeat.is_stale(now):
            age = now - heartbeat.updated_at
            problems.append(f"{name}: last heartbeat {age:.0f} s ago (every {heartbeat.interval:g} s): gone or stuck")
        elif not heartbeat.ready:
            problems.append(f"{name}: not ready: {heartbeat.reason}")
    if problems:
        return False, "; ".join(problems)
    return True, f"ok: {', '.join(sorted(selected))} ready"


def read_heartbeats() -> dict[bytes, bytes]:
    with broker_client(current_settings(), timeout=CHECK_TIMEOUT_SECONDS) as client:
        return client.hgetall(HEARTBEAT_KEY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help="one worker's Celery hostname (default: every `*@<this host>`)")
    parser.add_argument("--model", help="only workers serving this model")
    args = parser.parse_args(argv)
    try:
        fields = read_heartbeats()
    except (SettingsError, redis.RedisError) as exc:
        print(f"cannot read heartbeats: {exc}")
        return 1
    healthy, line = assess(fields, worker=args.worker, model=args.model, host=socket.gethostname(), now=time.time())
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
