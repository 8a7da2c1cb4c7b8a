"""Celery's own tooling against real workers: the celery CLI's control commands and workers started the
documented way (mingle and gossip on). Control replies and mingle traffic are Celery's, not jobs: they pass
the worker's transport as Celery expects, and nothing lands in the poison list."""

import json
import subprocess
import sys
import time
import urllib.error

import kronos_cases as kc
import pytest
from flower_process import Flower
from redis_server import RedisServer, free_port
from worker_process import REPO_ROOT, WorkerProcess, producer_app, serving_env

from schemas import ErrorCode, ForecastRequest
from tasks.keys import DELAYED_KEY
from tasks.routing import FORECAST_TASK
from worker.transport import POISON_KEY


@pytest.fixture(scope="module")
def fleet():
    with RedisServer() as server:
        env = serving_env(server)
        # two CPU workers on one host: each its own metrics port, as docs/CONFIGURATION.md says
        first_env, second_env = ({**env, "KRONOS_METRICS_PORT": str(free_port())} for _ in range(2))
        with (
            WorkerProcess(first_env, name="first", documented=True) as first,
            WorkerProcess(second_env, name="second", documented=True) as second,
        ):
            yield server, env, (first, second)


@pytest.mark.parametrize("app", ["worker.app", "tasks.app"])
def test_celery_inspect_ping_answers(fleet, app):
    server, env, _ = fleet
    ping = subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "inspect", "ping", "--timeout", "10"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("pong") == 2, ping.stdout
    assert server.client(0).llen(POISON_KEY) == 0


def test_workers_started_the_documented_way_log_no_error_and_refuse_nothing(fleet):
    server, _, workers = fleet
    for worker in workers:
        errors = [line for line in worker.log().splitlines() if '"level": "ERROR"' in line or "ERROR/" in line]
        assert not errors, errors
    assert server.client(0).llen(POISON_KEY) == 0


def test_flower_started_from_another_directory_still_demands_a_login(fleet, tmp_path):
    """flowerconfig.py is found wherever Flower starts: without a login configured it refuses to start, with
    one it refuses requests that do not bring it."""
    _, env, _ = fleet
    command = [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", f"--port={free_port()}"]
    bare = {k: v for k, v in env.items() if not k.startswith(("KRONOS_FLOWER_", "FLOWER_"))}
    refused = subprocess.run(command, cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "refusing to start Flower without authentication" in refused.stderr

    login = tmp_path / "flower-login"
    login.write_text("ops:secret\n")
    started = {**bare, "KRONOS_FLOWER_BASIC_AUTH_FILE": str(login), "KRONOS_FLOWER_DB": str(tmp_path / "flower.db")}
    flower = Flower(started, ("ops", "secret"), cwd=tmp_path)
    try:
        flower.start()
        for page in ("/", "/tasks", "/workers"):
            with pytest.raises(urllib.error.HTTPError) as unauthenticated:
                flower.get(page, auth=False)
            assert unauthenticated.value.code == 401
        assert b"Flower" in flower.get("/")
    finally:
        flower.stop()


def test_a_job_sent_without_a_priority_is_a_default_job_whoever_sent_it():
    """A stock client's job (no priority: kombu's bare list) is served after an urgent job and before a
    backfill, like the Python client's default: one priority scale for every client."""
    with RedisServer() as server:
        env = serving_env(server, KRONOS_CONCURRENCY="1", KRONOS_MAX_BATCH_SIZE="1", KRONOS_PREFETCH_MULTIPLIER="1")
        app = producer_app(env)
        queue = "kronos.kronos-small"
        sent = {
            "backfill": app.send_task(FORECAST_TASK, args=[request(1)], task_id="backfill", queue=queue, priority=7),
            "stock": app.send_task(FORECAST_TASK, args=[request(2)], task_id="stock", queue=queue),  # no priority
            "urgent": app.send_task(FORECAST_TASK, args=[request(3)], task_id="urgent", queue=queue, priority=3),
        }
        with WorkerProcess(env, name="ordered"):
            finished = {name: handle.get(timeout=60)["finished_at"] for name, handle in sent.items()}
        app.close()
    assert sorted(finished, key=finished.get) == ["urgent", "stock", "backfill"]


def request(seed: int) -> dict:
    frame = kc.candles().iloc[100 : 100 + 48]
    return ForecastRequest.from_frame(frame, pred_len=4, freq="5min", series_id=f"order-{seed}", seed=seed).model_dump(
        mode="json"
    )


def test_purge_takes_queued_jobs_off_and_their_ids_say_so(tmp_path):
    """Jobs queued with no worker running are purged; each id then reads as PURGED, not as still queued."""
    with RedisServer() as server:
        env = serving_env(server)
        from tasks.client import KronosClient

        with KronosClient(server.url(0), server.url(1)) as client:
            jobs = [client.submit(kc.candles().iloc[10 * i : 10 * i + 48], pred_len=4) for i in range(3)]
            assert sum(client.queue_depths().values()) == 3

            def cli(*arguments: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "tasks.cli", *arguments], cwd=REPO_ROOT, env=env,
                                      capture_output=True, text=True, timeout=60)  # fmt: skip

            assert cli("purge").returncode != 0  # not without --yes
            purged = cli("purge", "--yes", "--json")
            assert purged.returncode == 0, purged.stderr
            assert sorted(json.loads(purged.stdout)["purged"]) == sorted(job.id for job in jobs)
            assert sum(client.queue_depths().values()) == 0
            shown = cli("result", jobs[0].id, "--json")
            assert json.loads(shown.stdout)["error"]["code"] == "PURGED", shown.stdout
            status = client.job(jobs[1].id).poll()
            assert status.finished and status.error.code == ErrorCode.PURGED


def test_purge_takes_delayed_jobs_too():
    """Jobs with a countdown wait in Redis's delayed set once a worker has fetched them; purge answers them too."""
    with RedisServer() as server:
        env = serving_env(server)
        from tasks.client import KronosClient

        with KronosClient(server.url(0), server.url(1)) as client, WorkerProcess(env, name="parking"):
            later = [client.app.send_task(FORECAST_TASK, args=[request(seed)], countdown=600).id for seed in range(2)]
            broker = client.broker
            deadline = time.monotonic() + 60
            while broker.zcard(DELAYED_KEY) < 2:
                assert time.monotonic() < deadline, "the worker did not park the delayed jobs"
                time.sleep(0.1)
            purged = subprocess.run([sys.executable, "-m", "tasks.cli", "purge", "--yes", "--json"], cwd=REPO_ROOT,
                                    env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
            assert purged.returncode == 0, purged.stderr
            assert sorted(json.loads(purged.stdout)["purged"]) == sorted(later)
            assert broker.zcard(DELAYED_KEY) == 0
            assert client.job(later[0]).poll().error.code == ErrorCode.PURGED
