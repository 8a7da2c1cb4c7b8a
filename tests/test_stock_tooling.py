"""Celery's own tooling against real workers: the celery CLI's control commands and workers started the
documented way (mingle and gossip on). Control replies and mingle traffic are Celery's, not jobs: they pass
the worker's transport as Celery expects, and nothing lands in the poison list."""

import subprocess
import sys

import pytest
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, serving_env

from worker.transport import POISON_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet():
    with RedisServer() as server:
        env = serving_env(server)
        with (
            WorkerProcess(env, name="first", documented=True) as first,
            WorkerProcess(env, name="second", documented=True) as second,
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
