"""The launcher starts one worker per visible GPU, or one CPU worker, and passes signals on."""

import os
import signal
import subprocess
import sys
import time

import pytest
from redis_server import RedisServer
from worker_process import REPO_ROOT, worker_env

from worker.launch import plan


def test_one_process_per_gpu_named_after_it():
    assert plan([0, 1, 2], cpu=False) == [("gpu0", "cuda:0"), ("gpu1", "cuda:1"), ("gpu2", "cuda:2")]


def test_cpu_worker_when_no_gpu_or_asked():
    assert plan([], cpu=False) == [("cpu", "cpu")]
    assert plan([0, 1], cpu=True) == [("cpu", "cpu")]


@pytest.mark.integration
def test_launcher_starts_a_cpu_worker_and_stops_it_on_sigterm():
    with RedisServer() as server:
        env = worker_env(
            dict(os.environ), KRONOS_BROKER_URL=server.url(0), KRONOS_RESULT_BACKEND=server.url(1),
            PYTHONPATH=str(REPO_ROOT),
        )  # fmt: skip
        launcher = subprocess.Popen(
            [sys.executable, "-m", "worker.launch", "--cpu", "--", "-l", "info", "--without-mingle"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines = []
        until = time.monotonic() + 60
        while time.monotonic() < until and not any("ready." in line for line in lines):
            lines.append(launcher.stdout.readline())
        assert any("cpu@" in line and "ready." in line for line in lines), "".join(lines)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
