"""The launcher starts one worker per visible GPU, or one CPU worker, and passes signals on."""

import os
import signal
import subprocess
import sys
import time

from redis_server import RedisServer
from worker_process import REPO_ROOT, stop_launcher, worker_env


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
        try:
            lines = []
            until = time.monotonic() + 60
            while time.monotonic() < until and not any("ready." in line for line in lines):
                lines.append(launcher.stdout.readline())
            assert any("cpu@" in line and "ready." in line for line in lines), "".join(lines)
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(30) == 0
        finally:
            stop_launcher(launcher)
