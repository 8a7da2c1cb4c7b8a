"""A real Flower (`celery -A tasks.app flower`, configured by flowerconfig.py) for integration tests."""

import base64
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from redis_server import free_port
from worker_process import REPO_ROOT


class Flower:
    """Started with the env's KRONOS_* settings; `get` sends HTTP basic auth with `credentials` unless told not to."""

    def __init__(self, env: dict[str, str], credentials: tuple[str, str], cwd=REPO_ROOT):
        self.env = env
        self.credentials = credentials
        self.cwd = cwd  # where it is started from (flowerconfig.py is found wherever that is)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> "Flower":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", f"--port={self.port}"],
            env=dict(self.env, KRONOS_FLOWER_PORT=str(self.port)),
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until = time.monotonic() + 30
        while True:
            try:
                if self.get("/healthcheck", auth=False) == b"OK":
                    return self
            except urllib.error.URLError:
                assert time.monotonic() < until and self.process.poll() is None, "Flower did not start"
                time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, auth: bool = True) -> bytes:
        return self._request(urllib.request.Request(self.url(path)), auth)

    def post(self, path: str) -> bytes:
        return self._request(urllib.request.Request(self.url(path), data=b"", method="POST"), auth=True)

    def _request(self, request: urllib.request.Request, auth: bool) -> bytes:
        if auth:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Flower saves its state on the way out
            self.process.wait(20)
