"""Idle workers cost Redis nothing: they wait for Redis to announce a push onto their queues (worker/wakeup.py)
instead of running the pop script every KRONOS_POLL_INTERVAL_MS, and still take a job as soon as one comes,
a delayed one when it is due, and every job where Redis announces nothing. Of the idle workers of one queue,
one listens and the others wait for a token, so one push wakes one worker; a listener that stops or dies is
replaced. Real redis-server, real workers."""

import time
from collections.abc import Callable

import kronos_cases as kc
from redis_server import RedisServer
from worker_process import WorkerProcess, serving_env

from schemas import ForecastRequest
from tasks.client import KronosClient
from tasks.routing import FORECAST_TASK, queue_for_model
from worker import wakeup

# Longer than any wait below: a job that waited for the recheck instead of a ring would fail its test.
RECHECK = "60"


def pop_scripts_run(server: RedisServer) -> int:
    with server.client(0) as admin:
        return int(admin.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))


def listeners(server: RedisServer) -> int:
    """Connections subscribed to the announcements of pushes onto the queue."""
    with server.client(0) as admin:
        return admin.pubsub_numsub("__keyspace@0__:kronos.kronos-small")[0][1]


def listening_connections(server: RedisServer) -> set[str]:
    """The ids of the connections subscribed to more than their own probe's channel."""
    with server.client(0) as admin:
        return {client["id"] for client in admin.client_list() if int(client.get("sub", 0)) > 1}


def token_waiters(server: RedisServer) -> int:
    """Connections blocked in a BLPOP on a wake list."""
    with server.client(0) as admin:
        return sum(1 for client in admin.client_list() if client["cmd"] == "blpop" and "b" in client["flags"])


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Seconds until `condition` held; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_idle_worker_waits_for_a_push_instead_of_polling():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        with WorkerProcess(env, name="idle"), KronosClient(server.url(0), server.url(1)) as client:
            wait_until(lambda: listeners(server) == 1, "the idle worker listens")
            before = pop_scripts_run(server)
            time.sleep(5)
            # polling every 10 ms ran the pop script about 500 times in these 5 s; the listener renews its lease
            assert pop_scripts_run(server) - before <= 5 / wakeup.LISTENER_RENEW + 2
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
            wait_until(lambda: listeners(server) == 1, "the idle worker listens")
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
            assert pop_scripts_run(server) - before <= 6  # waiting: a pop at each renewal of its lease (1 s)
            with server.client(0) as admin:
                admin.config_set("notify-keyspace-events", "")
            time.sleep(8)  # one recheck finds its probe unheard; then it polls, and says so
            assert "does not announce pushes" in worker.log()
            started = time.monotonic()
            job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=4)
            assert len(job.wait(timeout=30).forecast["close"]) == 4
            assert time.monotonic() - started < 30


def test_of_three_idle_workers_one_listens_and_a_push_wakes_it_alone():
    """The other two wait in a BLPOP for a token: a push is announced to one process, not three. Each job the
    listener takes hands the lease on (a token), and the group has one listener and two waiters again."""
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        names = ("group-a", "group-b", "group-c")
        with (
            WorkerProcess(env, name=names[0]), WorkerProcess(env, name=names[1]), WorkerProcess(env, name=names[2]),
            KronosClient(server.url(0), server.url(1)) as client,
        ):  # fmt: skip
            settled = lambda: listeners(server) == 1 and token_waiters(server) == 2  # noqa: E731
            wait_until(settled, "one listener, two waiters")
            for seed in range(4):
                started = time.monotonic()
                job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=seed)
                assert len(job.wait(timeout=30).forecast["close"]) == 4
                assert time.monotonic() - started < 30  # a ring or a token woke a worker: the recheck is 60 s away
                wait_until(settled, f"one listener, two waiters again after job {seed}", timeout=20)


def test_a_listener_that_stops_hands_its_lease_on_at_once():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS=RECHECK)
        with WorkerProcess(env, name="first") as first:
            wait_until(lambda: listeners(server) == 1, "the first worker listens")
            with WorkerProcess(env, name="second"), KronosClient(server.url(0), server.url(1)) as client:
                wait_until(lambda: token_waiters(server) == 1, "the second worker waits for a token")
                before = listening_connections(server)
                first.stop()  # a warm shutdown resigns: without its token the waiter would wait out its BLPOP
                wait_until(lambda: listening_connections(server) - before, "the second worker listens", timeout=15)
                job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=7)
                assert len(job.wait(timeout=30).forecast["close"]) == 4


def test_a_killed_listener_is_replaced_within_its_lease_and_a_recheck():
    with RedisServer() as server:
        env = serving_env(server, KRONOS_IDLE_RECHECK_SECONDS="2")
        with WorkerProcess(env, name="doomed") as doomed:
            wait_until(lambda: listeners(server) == 1, "the first worker listens")
            with WorkerProcess(env, name="survivor"), KronosClient(server.url(0), server.url(1)) as client:
                wait_until(lambda: token_waiters(server) == 1, "the second worker waits for a token")
                before = listening_connections(server)
                doomed.kill()
                took = wait_until(lambda: listening_connections(server) - before, "the survivor listens", timeout=20)
                assert took < wakeup.LISTENER_LEASE + 2 + 5  # the lease lapses, the survivor's BLPOP times out
                job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=8)
                assert len(job.wait(timeout=30).forecast["close"]) == 4
