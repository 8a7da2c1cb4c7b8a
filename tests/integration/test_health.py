"""Heartbeats of real workers in Redis, and `python -m worker.health` as a container health check runs it."""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from redis_server import free_port
from worker_process import REPO_ROOT, WorkerProcess, serving_env

from schemas import HEARTBEAT_KEY, WorkerHeartbeat

INTERVAL = 1.0
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def env(server):
    return serving_env(
        server,
        KRONOS_HEARTBEAT_INTERVAL=str(INTERVAL),
        KRONOS_METRICS_ADDRESS="127.0.0.1",
    )


def health(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.health", *args],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def heartbeat(server, worker: str) -> WorkerHeartbeat | None:
    raw = server.client(0).hget(HEARTBEAT_KEY, worker)
    return None if raw is None else WorkerHeartbeat.model_validate_json(raw)


def wait_until(condition, timeout=30):
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.1)


def test_a_serving_worker_is_healthy_until_it_stops(server, env):
    port = free_port()
    worker_name = f"hb1@{HOST}"
    with WorkerProcess(dict(env, KRONOS_METRICS_PORT=str(port)), name="hb1") as worker:
        wait_until(lambda: (beat := heartbeat(server, worker_name)) is not None and beat.ready)
        beat = heartbeat(server, worker_name)
        assert beat.queue == "kronos.kronos-small" and beat.model == "kronos-small" and beat.device == "cpu"
        assert beat.pid == worker.process.pid and beat.interval == INTERVAL and beat.reason is None
        assert beat.model_id.endswith("predictor") and beat.tokenizer_id.endswith("tokenizer")
        first_update = beat.updated_at
        wait_until(lambda: heartbeat(server, worker_name).updated_at > first_update)  # it keeps beating

        for args in ((), ("--worker", worker_name), ("--model", "kronos-small")):
            result = health(env, *args)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout == f"ok: {worker_name} ready\n"
        result = health(env, "--model", "kronos-base")
        assert result.returncode == 1 and "no heartbeat of" in result.stdout

        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200

        worker.terminate()  # warm shutdown: the field is deleted, not left to go stale
        assert worker.wait_exit(30) == 0
    assert heartbeat(server, worker_name) is None
    result = health(env, "--worker", worker_name)
    assert result.returncode == 1
    assert result.stdout == f"no heartbeat of {worker_name} in Redis hash {HEARTBEAT_KEY}\n"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_a_killed_worker_goes_stale_and_fails_the_check(server, env):
    worker_name = f"hb2@{HOST}"
    with WorkerProcess(dict(env, KRONOS_METRICS_PORT="0"), name="hb2") as worker:
        try:
            wait_until(lambda: (beat := heartbeat(server, worker_name)) is not None and beat.ready)
            assert health(env, "--worker", worker_name).returncode == 0
        finally:
            worker.kill()  # SIGKILL: no shutdown, the field stays behind
    assert heartbeat(server, worker_name) is not None
    time.sleep(3 * INTERVAL + 1)
    result = health(env, "--worker", worker_name)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{worker_name}: last heartbeat ") and "gone or stuck" in result.stdout


def test_the_check_fails_with_a_reason_when_redis_is_unreachable(env):
    result = health(dict(env, KRONOS_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"))
    assert result.returncode == 1 and result.stdout.startswith("cannot read heartbeats:")
    result = health(dict(env, KRONOS_BROKER_URL="amqp://guest@rabbit//"))
    assert result.returncode == 1 and "KRONOS_BROKER_URL" in result.stdout
