"""JobRunner's decisions (worker/jobs.py) with stand-ins for Redis (claims, leases, results, quotas), the
served engine, the batcher and the Celery task: run or not by the claim, retry or fail by the error and the
retries left, the quota charged on the job's first run only, the deadline."""

from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import redis
import torch
from celery import states
from celery.exceptions import Reject, Retry

from schemas import ErrorCode, JobError, JobFailed, Limits
from worker.claims import CLAIMED, CONFLICT, FINAL, HELD, Claim
from worker.jobs import HELD_RECHECK_MARGIN, JobObserver, JobRunner
from worker.quotas import ADMITTED, REFUSED, RESERVED, Verdict
from worker.settings import load_worker_settings

MODEL = "kronos-small"
SETTINGS = load_worker_settings(
    {"KRONOS_MAX_RETRIES": "2", "KRONOS_RETRY_BACKOFF": "1", "KRONOS_RETRY_BACKOFF_MAX": "8"}
)
START = datetime(2024, 1, 2, 9, 30, tzinfo=UTC)


def request(**overrides) -> dict:
    closes = [10.0 + 0.1 * (row % 7) for row in range(32)]
    candles = {
        "timestamps": [(START + timedelta(minutes=5 * row)).isoformat() for row in range(32)],
        "open": closes,
        "high": [c + 0.1 for c in closes],
        "low": [c - 0.1 for c in closes],
        "close": closes,
    }
    return {"series_id": "AAPL", "candles": candles, "pred_len": 4, **overrides}


class Claims:
    def __init__(self, claim: Claim):
        self.next = claim
        self.claimed: list[str] = []
        self.released: list[str] = []
        self.conflicts: list[str] = []

    def claim(self, job_id: str, digest: str) -> Claim:
        self.claimed.append(job_id)
        if isinstance(self.next, Exception):
            raise self.next
        return self.next

    def release(self, job_id: str, token: str) -> None:
        self.released.append(job_id)

    def record_conflict(self, job_id: str, digest: str, other: str) -> JobError:
        self.conflicts.append(job_id)
        return JobError(code=ErrorCode.JOB_ID_CONFLICT, message="another request", job_id=job_id)


class Results:
    def __init__(self):
        self.stored: list[tuple[str, str, bool]] = []  # job id, state, stored as final (with a deadline)

    def store_result(self, job_id, value, state, request=None, deadline=None):
        self.stored.append((job_id, state, deadline is not None))

    def states(self) -> list[str]:
        return [state for _, state, _ in self.stored]


class Batcher:
    """Fails every job's batch with `error`, as the real Batcher hands a batch's exception to its jobs."""

    def __init__(self, error: BaseException):
        self.error = error
        self.submitted = []

    def submit(self, item) -> Future:
        self.submitted.append(item)
        future = Future()
        future.set_exception(self.error)
        return future


class Quotas:
    def __init__(self, outcome: int):
        self.outcome = outcome
        self.charged: list[str] = []

    def take(self, producer: str, job_id: str) -> Verdict:
        self.charged.append(job_id)
        return Verdict(self.outcome, 12.0, 6)


class Observer(JobObserver):
    def __init__(self):
        self.events: list[tuple] = []

    def job_failed(self, task, payload, error, will_retry):
        self.events.append(("failed", error.code, will_retry))

    def job_not_run(self, task, reason):
        self.events.append(("not run", reason))

    def job_over_quota(self, task, producer, action):
        self.events.append(("over quota", action))


class Task:
    """The part of a bound Celery task the runner uses: its request, retry() and a copy sent for later."""

    def __init__(self, job_id: str = "reports:job-1", retries: int = 0):
        self.request = SimpleNamespace(id=job_id, retries=retries, hostname="w@h", headers={})
        self.retried: list[dict] = []
        self.sent_later: list[float] = []

    def retry(self, exc, countdown, max_retries):
        self.retried.append({"exc": exc, "countdown": countdown, "max_retries": max_retries})
        return Retry(str(exc), exc, when=countdown)

    def signature_from_request(self, request, countdown, retries):
        self.sent_later.append(countdown)
        return SimpleNamespace(apply_async=lambda: None)


class Runner:
    """A JobRunner over the stand-ins, each one kept for the test to look at."""

    def __init__(
        self,
        claim: Claim | Exception,
        *,
        error: BaseException | None = None,
        quota: int | None = None,
        refusal: str | None = None,
        visibility_timeout: float = 30,
    ):
        engine = SimpleNamespace(
            info=SimpleNamespace(predictor_revision="r1"),
            prepare=lambda series: SimpleNamespace(pred_len=len(series.future_timestamps)),
        )
        error = RuntimeError("device lost") if error is None else error
        self.claims, self.results, self.batcher = Claims(claim), Results(), Batcher(error)
        self.leases = SimpleNamespace(hold=lambda job_id, token: None, let_go=lambda job_id, token: None)
        self.quotas = None if quota is None else Quotas(quota)
        self.observer = Observer()
        self.runner = JobRunner(
            slot=SimpleNamespace(current=SimpleNamespace(name=MODEL, engine=engine)),
            batcher=self.batcher, settings=SETTINGS, limits=Limits(), max_job_seconds=5, results=self.results,
            claims=self.claims, leases=self.leases, visibility_timeout=visibility_timeout,
            observers=[self.observer], refusal=lambda: refusal, quotas=self.quotas,
            producer_of=lambda task: "reports",
        )  # fmt: skip

    def run(self, task: Task, payload: dict | None = None):
        return self.runner.run(task, request() if payload is None else payload)


def claimed(runs: int = 1) -> Claim:
    return Claim(CLAIMED, "token", runs=runs)


def test_a_retryable_failure_goes_back_to_the_queue_with_backoff_while_retries_are_left():
    runner, task = Runner(claimed()), Task(retries=1)
    with pytest.raises(Retry):
        runner.run(task)
    [retry] = task.retried
    assert retry["exc"].error.code is ErrorCode.INTERNAL and retry["max_retries"] == 2
    assert 1.0 <= retry["countdown"] <= 2.0  # the second attempt: between half and all of 1 s * 2**1
    assert runner.claims.released == ["reports:job-1"]  # another delivery may claim it
    assert runner.results.states() == [states.STARTED, states.RETRY]
    assert runner.observer.events == [("failed", ErrorCode.INTERNAL, True)]


def test_a_retryable_failure_with_no_retries_left_is_final():
    runner, task = Runner(claimed(), error=torch.OutOfMemoryError("CUDA out of memory")), Task(retries=2)
    with pytest.raises(JobFailed) as failed:
        runner.run(task)
    assert failed.value.error.code is ErrorCode.RESOURCE_EXHAUSTED
    assert failed.value.error.job_id == "reports:job-1"
    assert task.retried == [] and runner.claims.released == []
    assert runner.results.stored[-1] == ("reports:job-1", states.FAILURE, True)  # the final write, retried
    assert runner.observer.events == [("failed", ErrorCode.RESOURCE_EXHAUSTED, False)]


def test_invalid_input_fails_at_once_without_a_retry_or_a_batch():
    runner, task = Runner(claimed()), Task(retries=0)
    with pytest.raises(JobFailed) as failed:
        runner.run(task, request(pred_len=0))
    assert failed.value.error.code is ErrorCode.INVALID_INPUT and failed.value.error.field == "pred_len"
    assert task.retried == [] and runner.batcher.submitted == []
    assert runner.results.states() == [states.STARTED, states.FAILURE]


def test_a_job_past_its_deadline_is_not_run_nor_retried():
    runner, task = Runner(claimed()), Task()
    with pytest.raises(JobFailed) as failed:
        runner.run(task, request(deadline=(datetime.now(UTC) - timedelta(seconds=1)).isoformat()))
    assert failed.value.error.code is ErrorCode.EXPIRED and failed.value.error.field == "deadline"
    assert runner.batcher.submitted == [] and task.retried == []


def test_a_pinned_revision_this_worker_does_not_serve_is_retried_for_another_worker():
    runner, task = Runner(claimed()), Task()
    with pytest.raises(Retry):
        runner.run(task, request(model_revision="r2"))
    assert task.retried[0]["exc"].error.code is ErrorCode.MODEL_NOT_READY
    assert runner.batcher.submitted == []


def test_the_quota_is_charged_on_the_first_run_and_over_it_the_job_fails_rate_limited():
    runner, task = Runner(claimed(runs=1), quota=REFUSED), Task()
    with pytest.raises(JobFailed) as failed:
        runner.run(task)
    assert failed.value.error.code is ErrorCode.RATE_LIMITED
    assert failed.value.error.details["retry_after"] == 12.0
    assert runner.quotas.charged == ["reports:job-1"] and runner.batcher.submitted == []
    assert ("over quota", "rejected") in runner.observer.events


def test_a_later_run_is_not_charged_again_whatever_retry_count_its_message_carries():
    # the producer wrote retries=0 on a job whose claim says it ran before: the claim counts, not the message
    runner, task = Runner(claimed(runs=2), quota=REFUSED), Task(retries=0)
    with pytest.raises(Retry):  # it reached the engine (whose stand-in fails it, retryably)
        runner.run(task)
    assert runner.quotas.charged == [] and len(runner.batcher.submitted) == 1


def test_a_job_admitted_by_its_quota_runs():
    runner, task = Runner(claimed(), quota=ADMITTED), Task()
    with pytest.raises(Retry):
        runner.run(task)
    assert runner.quotas.charged == ["reports:job-1"] and len(runner.batcher.submitted) == 1


def test_a_job_with_a_reserved_slot_is_sent_back_to_run_then_and_gives_up_its_claim():
    runner, task = Runner(claimed(), quota=RESERVED), Task()
    with pytest.raises(Retry) as retry:
        runner.run(task)
    assert retry.value.when == 12.0 and task.sent_later == [12.0]
    assert task.retried == []  # not a retry: its retry count stays
    assert runner.claims.released == ["reports:job-1"] and runner.batcher.submitted == []
    assert runner.observer.events == [("over quota", "delayed"), ("failed", ErrorCode.RATE_LIMITED, True)]


def test_a_job_whose_answer_is_stored_is_acknowledged_without_running():
    runner, task = Runner(Claim(FINAL, "token", detail="SUCCESS")), Task()
    assert runner.run(task) is None
    assert runner.results.stored == [] and runner.batcher.submitted == []
    assert runner.observer.events == [("not run", FINAL)]


def test_a_copy_of_a_job_running_elsewhere_comes_back_when_that_lease_may_have_lapsed():
    runner, task = Runner(Claim(HELD, "token", held_seconds=4.0)), Task()
    with pytest.raises(Retry):
        runner.run(task)
    assert task.sent_later == [4.0 + HELD_RECHECK_MARGIN]
    assert runner.results.stored == [] and runner.batcher.submitted == []


def test_an_id_naming_another_request_is_recorded_as_a_conflict_and_never_run():
    runner, task = Runner(Claim(CONFLICT, "token", detail="other digest")), Task()
    assert runner.run(task) is None
    assert runner.claims.conflicts == ["reports:job-1"]
    assert runner.results.stored == [] and runner.batcher.submitted == []


def test_an_open_circuit_hands_the_job_back_unstarted_and_unclaimed():
    runner, task = Runner(claimed(), refusal="circuit open: 5 jobs in a row failed internally"), Task()
    with pytest.raises(Reject) as rejected:
        runner.run(task)
    assert rejected.value.requeue is True
    assert runner.claims.claimed == [] and runner.results.stored == []


def test_a_claim_that_cannot_reach_redis_in_time_hands_the_message_back():
    runner, task = Runner(redis.ConnectionError("refused"), visibility_timeout=0.05), Task()
    with pytest.raises(Reject) as rejected:
        runner.run(task)
    assert rejected.value.requeue is True and runner.batcher.submitted == []
