"""Fault injection against a real redis-server and real worker processes: no job lost, duplicated or wrong.

Every scenario submits jobs the way a producer does and then accounts for each one: exactly one stored
outcome per job id, the outcome it should have (a result equal to what the engine computes for that
request, or the right error code), and nothing left behind in the queues.
"""

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import kronos_cases as kc
import numpy as np
import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, producer_app, worker_env

from schemas import ForecastRequest, JobFailed
from tasks.producer import submit
from tasks.routing import FORECAST_TASK

pytestmark = pytest.mark.slow

QUEUE = "kronos.kronos-small"
VISIBILITY = 6  # seconds: short, so that a killed worker's jobs come back within the test


def reliable_env(server: RedisServer, **overrides) -> dict[str, str]:
    settings = {
        "KRONOS_BROKER_URL": server.url(0),
        "KRONOS_RESULT_BACKEND": server.url(1),
        "KRONOS_MAX_JOB_SECONDS": str(VISIBILITY - 1),
        "KRONOS_VISIBILITY_TIMEOUT": str(VISIBILITY),
        "KRONOS_UNACKED_RESTORE_INTERVAL": "1",
        "KRONOS_MAX_BATCH_SIZE": "4",
        "KRONOS_CONCURRENCY": "8",
        "KRONOS_MAX_RETRIES": "2",
        "PYTHONPATH": str(REPO_ROOT),
    }
    return worker_env(dict(os.environ), **{**settings, **overrides})


def producer(env: dict[str, str]) -> Celery:
    app = producer_app(env)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "visibility_timeout": VISIBILITY}
    return app


def job(i: int, pred_len: int = 8, **options) -> ForecastRequest:
    options.setdefault("series_id", f"series-{i}")
    options.setdefault("seed", i)
    options.setdefault("job_id", f"job-{i}")
    frame = kc.candles().iloc[20 * i : 20 * i + 48]
    return ForecastRequest.from_frame(frame, pred_len=pred_len, freq="5min", **options)


def expected_close(request: ForecastRequest) -> list[float]:
    """The engine's forecast for the request, computed in this process."""
    frame = request.to_frame()
    future = request.resolved_future_timestamps()
    series = kc.SeriesInput(candles=frame, future_timestamps=future, seed=request.seed, top_p=request.top_p)
    return kc.engine().forecast([series])[0].mean["close"].tolist()


def outcome(server: RedisServer, job_id: str) -> dict | None:
    raw = server.client(1).get(f"celery-task-meta-{job_id}")
    return json.loads(raw) if raw else None


def queued(server: RedisServer) -> int:
    client = server.client(0)
    return sum(client.llen(QUEUE if p == 0 else f"{QUEUE}\x06\x16{p}") for p in range(10))


def wait_for_outcomes(server, job_ids, timeout=90) -> dict[str, dict]:
    until = time.monotonic() + timeout
    while True:
        done = {i: outcome(server, i) for i in job_ids}
        final = {i: o for i, o in done.items() if o and o["status"] in ("SUCCESS", "FAILURE")}
        if len(final) == len(job_ids) or time.monotonic() > until:
            return final
        time.sleep(0.2)


def assert_all_succeeded_correctly(server, requests, timeout=90):
    outcomes = wait_for_outcomes(server, [r.job_id for r in requests], timeout)
    missing = [r.job_id for r in requests if r.job_id not in outcomes]
    assert not missing, f"lost jobs: {missing}"
    for request in requests:
        stored = outcomes[request.job_id]
        assert stored["status"] == "SUCCESS", stored
        np.testing.assert_allclose(stored["result"]["forecast"]["close"], expected_close(request), rtol=1e-5)
    return outcomes


def wait_until(condition, timeout=30, what="condition"):
    until = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > until:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_sigkill_with_a_full_batch_and_prefetched_jobs_loses_nothing():
    with RedisServer() as server, ExitStack() as workers:  # every worker is stopped, whatever fails
        env = reliable_env(server)
        app = producer(env)
        requests = [job(0, series_id="fault:sleep:3"), *[job(i) for i in range(1, 12)]]
        victim = workers.enter_context(WorkerProcess(env, name="victim"))
        for request in requests:
            submit(request, celery_app=app)
        wait_until(lambda: server.client(0).hlen("unacked") >= 8, what="the worker to hold 8 jobs")
        assert "fault:sleep" in victim.log() or server.client(0).hlen("unacked") >= 8
        victim.kill()
        held = server.client(0).hlen("unacked")
        assert held >= 8, "the killed worker held a full batch and its prefetched jobs"

        with WorkerProcess(env, name="rescuer"):
            assert_all_succeeded_correctly(server, requests)  # from the stored results, each one a SUCCESS
        assert server.client(0).hlen("unacked") == 0 and queued(server) == 0
        app.close()


def test_sigterm_during_a_batch_finishes_it_and_returns_unstarted_jobs_at_once():
    with RedisServer() as server, ExitStack() as workers:
        env = reliable_env(server, KRONOS_PREFETCH_MULTIPLIER="2")  # holds jobs it has not started
        app = producer(env)
        requests = [job(0, series_id="fault:sleep:2"), *[job(i) for i in range(1, 20)]]
        worker = workers.enter_context(WorkerProcess(env, name="stopping"))
        for request in requests:
            submit(request, celery_app=app)
        wait_until(lambda: server.client(0).hlen("unacked") >= 12, what="the worker to hold jobs")
        started = time.monotonic()
        worker.terminate()
        assert worker.wait_exit(30) == 0
        assert time.monotonic() - started < 30
        restored = queued(server)
        assert restored > 0, "unstarted jobs go back to the queue at once, not after the visibility timeout"
        assert server.client(0).hlen("unacked") == 0
        finished_by_first = [r for r in requests if outcome(server, r.job_id)]
        assert len(finished_by_first) + restored == len(requests)
        assert "Restoring" in worker.log()

        with WorkerProcess(env, name="successor"):
            assert_all_succeeded_correctly(server, requests)
        app.close()


def test_redis_restart_loses_no_queued_job_and_keeps_stored_results():
    with RedisServer(appendonly=True) as server:
        env = reliable_env(server)
        app = producer(env)
        early = [job(i) for i in range(4)]
        with WorkerProcess(env, name="survivor") as worker:
            for request in early:
                submit(request, celery_app=app)
            before = assert_all_succeeded_correctly(server, early)
            late = [job(i, series_id=f"late-{i}") for i in range(4, 16)]
            late[0] = job(4, series_id="fault:sleep:2")
            for request in late:
                submit(request, celery_app=app)
            server.restart()  # jobs are queued and one is running
            after_restart = [job(i, series_id=f"after-{i}") for i in range(16, 20)]
            for request in after_restart:  # the producer reconnects by itself
                submit(request, celery_app=app)
            assert_all_succeeded_correctly(server, late + after_restart, timeout=150)
            assert worker.process.poll() is None, "the worker reconnected instead of dying"
        for request in early:
            assert outcome(server, request.job_id) == before[request.job_id]
        assert app.AsyncResult(early[0].job_id).get(timeout=10)["job_id"] == early[0].job_id
        app.close()


def test_a_job_run_twice_after_a_lost_ack_leaves_one_result():
    with RedisServer() as server, ExitStack() as workers:
        env = reliable_env(server)
        app = producer(env)
        request = job(3, series_id="fault:exit-after-result")
        doomed = workers.enter_context(WorkerProcess(env, name="doomed"))
        handle = submit(request, celery_app=app)
        assert doomed.wait_exit(60) == 17  # died after storing the result, before the ack
        first = outcome(server, request.job_id)
        assert first["status"] == "SUCCESS"
        assert server.client(0).hlen("unacked") == 1
        with WorkerProcess(env, name="second") as second:
            wait_until(lambda: server.client(0).hlen("unacked") == 0, timeout=VISIBILITY + 20, what="redelivery")
            wait_until(lambda: "kronos.forecast[job-3]" in second.log(), timeout=20, what="second delivery")
            time.sleep(1)
        assert outcome(server, request.job_id) == first, "the stored result was not replaced"
        assert handle.get(timeout=10) == first["result"]
        assert queued(server) == 0
        app.close()


def test_transient_faults_back_off_and_permanent_faults_are_dead_lettered_and_requeueable():
    with RedisServer() as server:
        env = reliable_env(server, KRONOS_RETRY_BACKOFF="0.5", KRONOS_RETRY_BACKOFF_MAX="5")
        app = producer(env)
        transient = job(1, series_id="fault:transient:2")
        permanent = job(2, series_id="fault:permanent")
        with WorkerProcess(env, name="faulty"):
            started = time.monotonic()
            assert submit(transient, celery_app=app).get(timeout=60)["series_id"] == "fault:transient:2"
            # equal jitter: each delay is at least half of 0.5 s, then 1 s
            assert time.monotonic() - started >= 0.25 + 0.5
            with pytest.raises(JobFailed) as failure:
                submit(permanent, celery_app=app).get(timeout=60)
        assert failure.value.error.code == "INTERNAL"
        assert outcome(server, permanent.job_id)["retries"] == 2
        assert outcome(server, transient.job_id)["retries"] == 2

        listing = subprocess.run(
            [sys.executable, "-m", "tasks.deadletter", "list", "--json"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        letters = json.loads(listing.stdout)
        assert [letter["job_id"] for letter in letters] == [permanent.job_id]
        assert letters[0]["error"]["code"] == "INTERNAL" and letters[0]["payload"]["series_id"] == "fault:permanent"

        # the cause is fixed (no more injected faults): requeue under the same id, and it succeeds
        fixed_env = {**env, "KRONOS_TEST_FAULTS": "0"}
        with WorkerProcess(fixed_env, name="fixed"):
            requeue = subprocess.run(
                [sys.executable, "-m", "tasks.deadletter", "requeue", permanent.job_id],
                env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert requeue.returncode == 0, requeue.stderr
            requeued_as = requeue.stdout.strip().removeprefix("requeued as: ")
            assert requeued_as.startswith(f"{permanent.job_id}.requeued-")
            succeeded = lambda: (outcome(server, requeued_as) or {}).get("status") == "SUCCESS"  # noqa: E731
            wait_until(succeeded, timeout=60, what="the requeued job")
        # the failed job's answer, which its producer may have read, stays what it was
        assert outcome(server, permanent.job_id)["result"]["exc_message"][0]["code"] == "INTERNAL"
        assert server.client(0).llen("kronos:dead-letter") == 0
        app.close()


# Mutations that make a valid request invalid, each by construction.
def _set(path, value):
    def mutate(payload):
        target = payload
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return payload

    return mutate


def _swap_timestamps(payload):
    stamps = payload["candles"]["timestamps"]
    stamps[3], stamps[7] = stamps[7], stamps[3]
    return payload


def _duplicate_timestamp(payload):
    payload["candles"]["timestamps"][5] = payload["candles"]["timestamps"][4]
    return payload


INVALID_MUTATIONS = st.sampled_from(
    [
        _set(("top_p",), "high"),
        _set(("pred_len",), 1.5),
        _set(("sample_count",), -3),
        _set(("temperature",), float("nan")),
        _set(("temperature",), float("inf")),
        _set(("candles", "close", 2), 1e308),
        _set(("candles", "open", 0), float("nan")),
        _set(("candles", "volume", 1), -5.0),
        _set(("candles", "high", 4), 0.0),
        _set(("candles", "close"), [1.0] * 3),
        _set(("candles", "timestamps", 0), "not a time"),
        _set(("candles",), {"timestamps": []}),
        _set(("candles", "close"), list(range(200_000))),
        _set(("pred_len",), 10**9),
        _set(("series_id",), ""),
        _set(("unexpected_field",), {"nested": [1, 2, 3]}),
        _set(("quantiles",), [0.0, 2.0]),
        _set(("seed",), -1),
        _swap_timestamps,
        _duplicate_timestamp,
    ]
)


@pytest.fixture(scope="module")
def steady_worker():
    with RedisServer() as server:
        env = reliable_env(server, KRONOS_MAX_JOB_SECONDS="60", KRONOS_VISIBILITY_TIMEOUT="200")
        app = producer(env)
        with WorkerProcess(env, name="steady") as worker:
            yield server, app, worker
        app.close()


def _valid_job_latency(app, n=3) -> float:
    started = time.monotonic()
    for i in range(n):
        submit(job(i, series_id=f"probe-{time.monotonic_ns()}", job_id=None), celery_app=app).get(timeout=60)
    return (time.monotonic() - started) / n


@given(mutation=INVALID_MUTATIONS, unicode_id=st.text(min_size=1, max_size=40).filter(str.isprintable))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_malformed_requests_end_as_invalid_input_and_odd_but_valid_ones_succeed(steady_worker, mutation, unicode_id):
    _, app, _ = steady_worker
    payload = mutation(job(1, job_id=None).model_dump(mode="json"))
    with pytest.raises(JobFailed) as failure:
        app.send_task(FORECAST_TASK, args=[payload], queue=QUEUE).get(timeout=30)
    assert failure.value.error.code == "INVALID_INPUT", failure.value.error
    valid = job(2, job_id=None, series_id=unicode_id)
    assert submit(valid, celery_app=app).get(timeout=30)["series_id"] == unicode_id


def test_junk_pushed_straight_onto_the_queue_does_not_stop_the_worker(steady_worker):
    server, app, worker = steady_worker
    before = _valid_job_latency(app)
    client = server.client(0)
    for junk in [b"\xff\xfe\x00", b"not json", b"[1, 2", json.dumps({"body": 1}).encode(), b"{}", b"null"]:
        client.lpush(QUEUE, junk)
    after = _valid_job_latency(app)
    assert worker.process.poll() is None
    assert after < 5 * before + 1.0, f"valid jobs slowed from {before:.3f} s to {after:.3f} s"
    assert client.llen("kronos:poison") >= 3
    assert queued(server) == 0


def test_overload_queues_the_burst_expires_late_jobs_and_memory_stays_flat(steady_worker):
    server, app, worker = steady_worker
    rss_before = _rss_kib(worker.process.pid)
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    burst = []
    for i in range(400):
        request = job(i % 100, pred_len=4, job_id=f"burst-{i}", deadline=deadline if i % 8 == 7 else None)
        burst.append(submit(request, celery_app=app))
    outcomes = wait_for_outcomes(server, [h.id for h in burst], timeout=240)
    assert len(outcomes) == len(burst), "every job of the burst ends"
    codes = {}
    for handle in burst:
        stored = outcomes[handle.id]
        if stored["status"] == "FAILURE":
            code = stored["result"]["exc_message"][0]["code"]
            assert code == "EXPIRED" and handle.id.endswith(tuple(f"-{i}" for i in range(7, 400, 8)))
            codes[code] = codes.get(code, 0) + 1
    assert codes.get("EXPIRED", 0) > 0, "some deadline-bound jobs waited past their deadline"
    rss_after = _rss_kib(worker.process.pid)
    assert rss_after - rss_before < 60 * 1024, f"RSS grew from {rss_before} KiB to {rss_after} KiB"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
