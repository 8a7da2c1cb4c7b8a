"""The worker's result backend: a job's final answer is written once and never replaced.

Celery's Redis backend writes a result key with a plain SET (after a separate GET that skips only over a
stored SUCCESS), so a late PROGRESS from a batch that outlived its job's wait, or a redelivered copy's
STARTED and SUCCESS, replaced a stored FAILURE, and the producer saw two answers. Here every write of a
job's state is one Lua script, a compare-and-set: PENDING, STARTED, PROGRESS and RETRY may be replaced;
SUCCESS, FAILURE and REVOKED never. The same script marks the job's claim final (worker/claims.py), so a
later copy of the job is acknowledged without running.

The two kinds of write differ in what a slow Redis may cost:
- A final write retries with backoff while Redis is unreachable or (KRONOS_REPLICAS_TO_ACK) no replica has
  confirmed it, until its deadline (by default KRONOS_VISIBILITY_TIMEOUT from now); then it raises
  RedisUnreachable, and the caller leaves the job to be delivered again rather than fail it.
- Every other state (STARTED, PROGRESS, RETRY) is best effort: handed to one writer thread that keeps only
  the latest state of each job and drops what it cannot write, so it never blocks, delays or fails a job.

The worker app selects this class (worker/app.py); producers read results with Celery's own backend.
"""

import logging
import math
import threading
import time

import redis
from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.utils.json import dumps

from tasks.keys import CLAIM_KEY_PREFIX
from tasks.outcomes import WRITE_STATE
from tasks.replication import check_acknowledged, wait_command
from tasks.settings import current_settings

log = logging.getLogger(__name__)

FINAL_STATES = states.READY_STATES  # SUCCESS, FAILURE, REVOKED
# What a final write may meet from a Redis that restarts, fails over or is unreachable for a while.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 2.0


class RedisUnreachable(Exception):
    """A write that had to happen could not before its deadline: Redis was unreachable all along."""


def retry_transient(action, deadline: float, what: str):
    """`action()`, tried again with backoff (0.1 s doubling to 2 s) while Redis is unreachable, until the
    time.monotonic() `deadline`; then RedisUnreachable."""
    pause = FIRST_RETRY_SECONDS
    while True:
        try:
            return action()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                raise RedisUnreachable(f"{what}: {exc!r}") from exc
            log.warning("%s failed (%r); trying again in %.1f s", what, exc, pause)
            time.sleep(pause)
            pause = min(2 * pause, MAX_RETRY_SECONDS)


class ResultBackend(RedisBackend):
    """The worker's backend on redis:// and rediss:// URLs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.final_write_seconds = float(current_settings().visibility_timeout)
        self._write_state = self.client.register_script(WRITE_STATE)
        self._best_effort = LatestStateWriter(self)

    def store_result(self, task_id, result, state, traceback=None, request=None, deadline=None, **kwargs):
        """Write `state` for the job: final states with retries until `deadline` (a time.monotonic() value),
        others best effort. A final write that meets a stored final answer leaves it and returns."""
        document = self.encode(self._document(task_id, self.encode_result(result, state), state, traceback, request))
        if state in FINAL_STATES:
            self._write_final(task_id, document, state, deadline)
        else:
            self._best_effort.offer(task_id, document, state)
        return result

    def encode(self, data) -> str:
        """Strict JSON (RFC 8259), which every language's parser reads: a NaN or Infinity anywhere (say, echoed
        from a request that was refused for holding it) is written as null."""
        try:
            return dumps(data, allow_nan=False)
        except ValueError:
            return dumps(_finite_or_null(data), allow_nan=False)

    def _document(self, task_id, result, state, traceback, request) -> dict:
        """Celery's result document, with the operator's view of the delivery (task, worker, queue, retries)
        instead of result_extended's copy of the arguments: a result never echoes the request's candles."""
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=None)
        meta["task_id"] = task_id
        if request is not None:
            meta.update(
                name=getattr(request, "task", None),
                worker=getattr(request, "hostname", None),
                retries=getattr(request, "retries", None),
                queue=(getattr(request, "delivery_info", None) or {}).get("routing_key"),
            )
        return meta

    def _write_final(self, task_id: str, document: str, state: str, deadline: float | None) -> None:
        deadline = deadline if deadline is not None else time.monotonic() + self.final_write_seconds
        what = f"job {task_id}: storing {state}"
        retry_transient(lambda: self._write_final_once(task_id, document, state, what), deadline, what)

    def _write_final_once(self, task_id: str, document: str, state: str, what: str) -> None:
        """The compare-and-set, and with KRONOS_REPLICAS_TO_ACK the WAIT for replicas on the same connection
        (tasks/replication.py). An answer no replica confirmed is not stored yet: NotReplicated, a connection
        error, so the write is tried again (the compare-and-set keeps the first answer) until replicas confirm
        or the deadline passes. Acknowledging the job on it would risk the job: in a failover the answer dies
        with the old master, while the ack, sent on a connection that has already found the new one, stands."""
        shared = current_settings()
        if not shared.replicas_to_ack:
            self.write_state(task_id, document, state)
            return
        with self.client.pipeline(transaction=False) as pipe:
            self.write_state(task_id, document, state, client=pipe)
            pipe.execute_command(*wait_command(shared.replicas_to_ack, shared.replica_ack_timeout))
            _, acknowledged = pipe.execute()
        check_acknowledged(acknowledged, shared.replicas_to_ack, shared.replica_ack_timeout, what)

    def write_state(self, task_id: str, document: str, state: str, client=None) -> bool:
        """One compare-and-set of the job's state (one round trip); False when a final answer was there."""
        expires = self.failure_expires if state == states.FAILURE else self.expires
        keys = [self.get_key_for_task(task_id), CLAIM_KEY_PREFIX + task_id]
        args = [document, state, int(expires or 0), 1 if state in FINAL_STATES else 0]
        return bool(self._write_state(keys=keys, args=args, client=client or self.client))


class SentinelResultBackend(ResultBackend, SentinelBackend):
    """The same on sentinel:// URLs: Celery's Sentinel backend finds the master (its client asks the sentinels
    again after a failover), this class's methods write to it."""


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


class LatestStateWriter:
    """Writes non-final states from a thread of its own, the latest per job, in one pipeline per round.

    offer() never blocks. A write that fails is dropped (the next state of the job, or its final answer,
    supersedes it); a write that arrives after the job's final answer is refused by the compare-and-set."""

    def __init__(self, backend: ResultBackend):
        self.backend = backend
        self._pending: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def offer(self, task_id: str, document: str, state: str) -> None:
        with self._lock:
            self._pending[task_id] = (document, state)
            if self._thread is None:  # started on first use: producers importing the app never start it
                self._thread = threading.Thread(target=self._run, name="kronos-state-writer", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, {}
            try:
                with self.backend.client.pipeline(transaction=False) as pipe:
                    for task_id, (document, state) in batch.items():
                        self.backend.write_state(task_id, document, state, client=pipe)
                    pipe.execute()
            except Exception as exc:  # advisory states: dropped, the job goes on
                log.warning("%d job state(s) not stored (%r); dropped", len(batch), exc)
