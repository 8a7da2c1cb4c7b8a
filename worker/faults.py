"""Fault injection for the reliability tests; off unless KRONOS_TEST_FAULTS=1.

With the switch on, a job whose series_id starts with `fault:` carries a directive that the batch
runner acts on inside the engine call, exactly where a real failure would surface:

    fault:transient:N     raises InjectedFault on the job's first N attempts (retries 0..N-1)
    fault:permanent       raises InjectedFault on every attempt
    fault:oom-above:N     raises a simulated out-of-memory whenever its batch holds more than N jobs
    fault:sleep:S         sleeps S seconds before inference (a long job for shutdown and kill tests)
    fault:exit-after-result  on a worker named doomed@..., exits the process once the job's result is
                          stored and before it is acknowledged (a lost ack: the job is delivered again)

A worker-wide fault needs no job: with KRONOS_TEST_FAULT_KEY naming a Redis key (broker DB), every batch
on that worker, circuit-breaker probes included, raises InjectedFault while the key exists. A test sets
the key to make a worker fail persistently and deletes it to "fix" the worker.

The worker logs a warning at start when the switch is on. Production never sets it.
"""

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "fault:"
DOOMED_WORKER_PREFIX = "doomed@"
log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """A failure the tests asked for."""


class SimulatedOutOfMemory(InjectedFault):
    """Stands in for torch.OutOfMemoryError on machines without a GPU."""


@dataclass(frozen=True)
class Fault:
    kind: str
    amount: float

    @classmethod
    def parse(cls, series_id: str) -> "Fault | None":
        if not series_id.startswith(PREFIX):
            return None
        kind, _, amount = series_id[len(PREFIX) :].partition(":")
        try:
            return cls(kind, float(amount.partition(":")[0] or 0))
        except ValueError:
            return None


def apply(faults: Sequence[tuple[Fault | None, int]], batch_size: int) -> None:
    """Act on the directives of a batch: (fault, attempt) per job, before the engine runs."""
    for fault, attempt in faults:
        if fault is None:
            continue
        if fault.kind == "sleep":
            time.sleep(fault.amount)
        elif fault.kind == "transient" and attempt < fault.amount:
            raise InjectedFault(f"injected transient fault (attempt {attempt + 1} of {int(fault.amount)} failing)")
        elif fault.kind == "permanent":
            raise InjectedFault("injected permanent fault")
        elif fault.kind == "oom-above" and batch_size > fault.amount:
            raise SimulatedOutOfMemory(f"simulated out of memory at batch size {batch_size}")


def raise_while_key_exists(client, key: str) -> None:
    """The worker-wide fault: called before every batch when KRONOS_TEST_FAULT_KEY is set."""
    if client.exists(key):
        raise InjectedFault(f"injected worker-wide fault (Redis key {key!r} exists)")


def exit_after_result(task, result) -> None:
    """task_success handler: Celery sends it after storing the result and before the ack."""
    fault = Fault.parse(result.get("series_id", "")) if isinstance(result, dict) else None
    if fault and fault.kind == "exit-after-result" and (task.request.hostname or "").startswith(DOOMED_WORKER_PREFIX):
        log.warning("injected exit after storing the result of %s, before its ack", task.request.id)
        os._exit(17)
