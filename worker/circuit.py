"""Circuit breaker: a worker that keeps failing internally stops taking jobs until a probe passes.

A broken device or a corrupt engine fails every job it touches; without a breaker such a worker would keep
pulling jobs off the queue and burning their retries while healthy workers sit idle. When `threshold`
different jobs failed internally in a row (INTERNAL, or RESOURCE_EXHAUSTED even alone in a batch; never
invalid input, an expired deadline or a timeout, which say nothing about the worker) the circuit opens.
Different jobs: one poison job failing all its retries says nothing about the worker either.

- the worker cancels its queue consumer, so it fetches no more jobs;
- jobs it fetched earlier and had not started are rejected back to the head of the queue, unstarted and
  without spending a retry (JobRunner asks `refusal()` first), where healthy workers take them;
- readiness says "circuit open: <cause>" (heartbeat ready=false, /readyz 503), `kronos_circuit_open` is 1.

Every `cooldown` seconds it runs a probe (a smoke forecast through the batcher and the engine, with the
test-only fault injection still applied); when one passes the worker consumes its queue again and the
circuit closes, else it waits another cool-down.
"""

import logging
import threading
from collections.abc import Callable

from schemas import ErrorCode, ForecastResult, JobError
from worker.jobs import JobObserver

log = logging.getLogger(__name__)

# Codes that say the worker, not the job, is at fault.
INTERNAL_CODES = frozenset({ErrorCode.INTERNAL, ErrorCode.RESOURCE_EXHAUSTED})


class CircuitBreaker(JobObserver):
    def __init__(
        self,
        *,
        threshold: int,
        cooldown: float,
        stop_consuming: Callable[[], None],
        resume_consuming: Callable[[], None],
        probe: Callable[[], None],
        on_change: Callable[[str | None], None],
    ):
        self.threshold = threshold  # 0: never opens
        self.cooldown = cooldown
        self.stop_consuming = stop_consuming
        self.resume_consuming = resume_consuming
        self.probe = probe  # raises when the worker still cannot forecast
        self.on_change = on_change  # the open circuit's cause, or None when it closed
        self._failing_jobs: set[str] = set()  # since the last success
        self._open_reason: str | None = None
        self._lock = threading.Lock()  # job outcomes arrive from every pool thread
        self._stopped = threading.Event()

    def refusal(self) -> str | None:
        """Why this worker must not start a job now, or None."""
        return self._open_reason

    def job_succeeded(self, task, result: ForecastResult) -> None:
        with self._lock:
            self._failing_jobs.clear()

    def job_failed(self, task, payload, error: JobError, will_retry: bool) -> None:
        if error.code not in INTERNAL_CODES:
            return
        with self._lock:
            if self._open_reason is not None or not self.threshold:
                return
            self._failing_jobs.add(task.request.id)
            if len(self._failing_jobs) < self.threshold:
                return
            failures = len(self._failing_jobs)
            self._open_reason = f"circuit open: {failures} jobs in a row failed internally, last: {error.message}"
        log.error("%s; stopping consumption, probing every %g s", self._open_reason, self.cooldown)
        self.on_change(self._open_reason)
        threading.Thread(target=self._recover, name="kronos-circuit", daemon=True).start()

    def stop(self) -> None:
        """At shutdown: end the recovery loop."""
        self._stopped.set()

    def _recover(self) -> None:
        try:
            self.stop_consuming()
        except Exception:  # still refusing every job it fetches, so the queue's jobs go to other workers
            log.exception("could not cancel the queue consumer")
        while not self._stopped.wait(self.cooldown):
            try:
                self.probe()
            except Exception as exc:
                log.warning("circuit probe failed (%s: %s); next probe in %g s", type(exc).__name__, exc, self.cooldown)
                continue
            try:
                self.resume_consuming()
            except Exception:
                log.exception("probe passed but the queue consumer could not be added; retrying after a cool-down")
                continue
            with self._lock:
                self._failing_jobs.clear()
                self._open_reason = None
            log.warning("circuit closed: the probe passed; consuming again")
            self.on_change(None)
            return
