"""Idle workers cost Redis nothing: they wait for Redis to announce a push onto their queues (worker/wakeup.py)
instead of running the pop script every KRONOS_POLL_INTERVAL_MS, and still take a job as soon as one comes,
a delayed one when it is due, and every job where Redis announces nothing. Real redis-server, real workers."""

import time

import kronos_cases as kc
from redis_server import RedisServer
from worker_process import WorkerProcess, serving_env

from schemas import ForecastRequest
from tasks.client import KronosClient
from tasks.routing import FORECAST_TASK, queue_for_model

# Longer than any wait below: a job that waited for the recheck instead of a ring would fail its test.
RECHECK = "60"


def pop_scripts_run(server: RedisServer) -> int:
    with server.client(0) as admin:
        return int(admin.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))


def wait_until_idle(server: RedisServer, seconds: float = 3.0) -> None:
    """Until the worker has gone a while without a pop (it probes its subscription first)."""
    deadline = time.monotonic() + 30
    before = pop_scripts_run(server)
    while True:
        time.sleep(seconds)
        now = pop_scripts_run(server)
        if now == before:
            return
        assert time.monotonic() < deadline, "the idle worker never stopped popping"
        before = now


def test_an_idle_worker_waits_for_a_push_instead_of_polling():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        with WorkerProcess(env, name="idle"), KronosClient(server.url(0), server.url(1)) as client:
            wait_until_idle(server)
            before = pop_scripts_run(server)
            time.sleep(5)
            # polling every 10 ms ran the pop script about 500 times in these 5 s
            assert pop_scripts_run(server) - before <= 2
            with server.client(0) as admin:
                assert admin.pubsub_numsub("__keyspace@0__:kronos.kronos-small")[0][1] >= 1
            started = time.monotonic()
            job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=1)
            assert len(job.wait(timeout=30).forecast["close"]) == 4
            assert time.monotonic() - started < 30  # the ring woke it: the recheck is a minute away


def test_a_delayed_job_runs_when_due_while_the_worker_is_idle():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        with WorkerProcess(env, name="idle-delayed"), KronosClient(server.url(0), server.url(1)) as client:
            wait_until_idle(server)
            frame = kc.candles().iloc[:48]
            request = ForecastRequest.from_frame(frame, pred_len=4, freq="5min", series_id="later", seed=2)
            started = time.monotonic()
            sent = client.app.send_task(FORECAST_TASK, args=[request.model_dump(mode="json")], countdown=3,
                                        queue=queue_for_model("kronos-small"))  # fmt: skip
            assert sent.get(timeout=40)["forecast"]
            assert 3 <= time.monotonic() - started < 40  # not before it was due, nor at the recheck


def test_where_redis_announces_nothing_an_idle_worker_polls_and_says_so():
    with RedisServer() as server:
        with server.client(0) as admin:
            admin.config_set("notify-keyspace-events", "")
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        with WorkerProcess(env, name="unannounced") as worker, KronosClient(server.url(0), server.url(1)) as client:
            time.sleep(5)
            assert "does not announce pushes" in worker.log()
            job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=3)
            assert len(job.wait(timeout=30).forecast["close"]) == 4


def test_announcements_switched_off_while_a_worker_waits_cost_at_most_one_recheck():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS="2")
        with WorkerProcess(env, name="switched-off") as worker, KronosClient(server.url(0), server.url(1)) as client:
            time.sleep(3)
            before = pop_scripts_run(server)
            time.sleep(4)
            assert pop_scripts_run(server) - before <= 3  # waiting: a pop at each 2 s recheck
            with server.client(0) as admin:
                admin.config_set("notify-keyspace-events", "")
            time.sleep(8)  # one recheck finds its probe unheard; then it polls, and says so
            assert "does not announce pushes" in worker.log()
            started = time.monotonic()
            job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=4)
            assert len(job.wait(timeout=30).forecast["close"]) == 4
            assert time.monotonic() - started < 30
