"""The circuit breaker (worker/circuit.py) with stand-ins for the consumer and the probe: it opens when
`threshold` different jobs fail internally in a row, refuses jobs while open, probes every cool-down, and
closes when a probe passes."""

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from schemas import ErrorCode, JobError
from worker.circuit import CircuitBreaker

COOLDOWN = 0.05
WAIT = 5  # seconds a test waits for the recovery thread before it fails


class Worker:
    """What the breaker acts on: the queue consumer, the probe (failing until `healthy` is set), readiness."""

    def __init__(self):
        self.consuming = True
        self.healthy = threading.Event()
        self.probes = 0
        self.changes: list[str | None] = []
        self.stopped = threading.Event()
        self.resumed = threading.Event()

    def stop_consuming(self) -> None:
        self.consuming = False
        self.stopped.set()

    def resume_consuming(self) -> None:
        self.consuming = True
        self.resumed.set()

    def probe(self) -> None:
        self.probes += 1
        if not self.healthy.is_set():
            raise RuntimeError("device lost")


@pytest.fixture
def worker() -> Worker:
    return Worker()


@pytest.fixture
def breaker(worker: Worker) -> Iterator[CircuitBreaker]:
    circuit = CircuitBreaker(
        threshold=3,
        cooldown=COOLDOWN,
        stop_consuming=worker.stop_consuming,
        resume_consuming=worker.resume_consuming,
        probe=worker.probe,
        on_change=worker.changes.append,
    )
    yield circuit
    circuit.stop()


def job(job_id: str) -> SimpleNamespace:
    """A stand-in for the Celery task: the breaker reads only the job id of its request."""
    return SimpleNamespace(request=SimpleNamespace(id=job_id))


def fail(breaker: CircuitBreaker, job_id: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
    breaker.job_failed(job(job_id), {}, JobError(code=code, message=f"{job_id} failed"), will_retry=True)


def test_it_opens_when_threshold_different_jobs_fail_internally_in_a_row(breaker, worker):
    fail(breaker, "a")
    fail(breaker, "b", ErrorCode.RESOURCE_EXHAUSTED)
    assert breaker.refusal() is None
    fail(breaker, "c")
    reason = breaker.refusal()
    assert reason == "circuit open: 3 jobs in a row failed internally, last: c failed"
    assert worker.changes == [reason]
    assert worker.stopped.wait(WAIT) and not worker.consuming


def test_one_job_failing_again_and_again_does_not_open_it(breaker):
    for _ in range(10):
        fail(breaker, "poison")
    assert breaker.refusal() is None


@pytest.mark.parametrize(
    "code", [ErrorCode.INVALID_INPUT, ErrorCode.EXPIRED, ErrorCode.TIMEOUT, ErrorCode.RATE_LIMITED]
)
def test_failures_that_say_nothing_about_the_worker_do_not_count(breaker, code):
    for number in range(10):
        fail(breaker, f"job-{number}", code)
    assert breaker.refusal() is None


def test_a_success_starts_the_count_again(breaker):
    fail(breaker, "a")
    fail(breaker, "b")
    breaker.job_succeeded(job("ok"), result=None)
    fail(breaker, "c")
    fail(breaker, "d")
    assert breaker.refusal() is None
    fail(breaker, "e")
    assert breaker.refusal() is not None


def test_a_threshold_of_zero_never_opens(worker):
    never = CircuitBreaker(threshold=0, cooldown=COOLDOWN, stop_consuming=worker.stop_consuming,
                           resume_consuming=worker.resume_consuming, probe=worker.probe,
                           on_change=worker.changes.append)  # fmt: skip
    for number in range(10):
        fail(never, f"job-{number}")
    assert never.refusal() is None and worker.changes == []


def test_it_stays_open_while_probes_fail_and_closes_after_one_passes(breaker, worker):
    for job_id in "abc":
        fail(breaker, job_id)
    assert worker.stopped.wait(WAIT)
    # half-open: a probe every cool-down; failing ones leave it open and the consumer cancelled
    wait_for(lambda: worker.probes >= 3)
    assert breaker.refusal() is not None and not worker.resumed.is_set()

    worker.healthy.set()
    assert worker.resumed.wait(WAIT) and worker.consuming
    wait_for(lambda: breaker.refusal() is None)
    assert worker.changes[-1] is None
    # closed with a clean slate: it takes `threshold` new failures to open it again
    fail(breaker, "d")
    fail(breaker, "e")
    assert breaker.refusal() is None


def test_a_probe_that_passes_while_the_consumer_cannot_be_added_leaves_it_open(worker):
    attempts = []

    def resume_failing_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("broker away")
        worker.resume_consuming()

    worker.healthy.set()
    circuit = CircuitBreaker(threshold=1, cooldown=COOLDOWN, stop_consuming=worker.stop_consuming,
                             resume_consuming=resume_failing_once, probe=worker.probe,
                             on_change=worker.changes.append)  # fmt: skip
    try:
        fail(circuit, "a")
        assert worker.resumed.wait(WAIT)
        wait_for(lambda: circuit.refusal() is None)
        assert len(attempts) == 2
    finally:
        circuit.stop()


def wait_for(condition, timeout: float = WAIT) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, "the recovery thread did not get there in time"
        time.sleep(0.01)
