"""A real `celery -A worker.app worker` subprocess for integration tests, serving the tiny fixture model."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery
from kronos_cases import PARITY

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "model loaded"


def worker_env(base: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment of a worker that serves the fixture checkpoints on CPU, with fast retries."""
    env = dict(base)
    env.update(
        KRONOS_PREDICTOR=str(PARITY / "predictor"),
        KRONOS_TOKENIZER=str(PARITY / "tokenizer"),
        KRONOS_DEVICE="cpu",
        KRONOS_TORCH_THREADS="1",
        KRONOS_RETRY_BACKOFF="0.2",
        KRONOS_RETRY_BACKOFF_MAX="1",
        KRONOS_MAX_BATCH_WAIT_MS="100",
        KRONOS_TEST_FAULTS="1",
        KRONOS_MIN_CANDLES="2",
        # Workers start in seconds, not in a compile: the compiled decode step is tested on its own
        # (tests/integration/test_engine_compile.py) and in one worker (tests/integration/test_worker_startup.py).
        TORCH_COMPILE_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def serving_env(server, **overrides: str) -> dict[str, str]:
    """worker_env for a worker on a test RedisServer: broker on DB 0, results on DB 1, code from this checkout."""
    return worker_env(
        dict(os.environ),
        KRONOS_BROKER_URL=server.url(0),
        KRONOS_RESULT_BACKEND=server.url(1),
        PYTHONPATH=str(REPO_ROOT),
        **overrides,
    )


def producer_app(env: dict[str, str], **conf) -> Celery:
    """A producer's Celery app on the env's Redis (the import-time tasks.app reads this process's env)."""
    app = Celery("kronos-producer")
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=env["KRONOS_BROKER_URL"], result_backend=env["KRONOS_RESULT_BACKEND"], **conf)
    return app


class WorkerProcess:
    """Start with `start()`; `wait_ready()` returns once the model is loaded and the consumer runs."""

    def __init__(
        self, env: dict[str, str], name: str = "cpu", extra_args: tuple[str, ...] = (), *, documented: bool = False
    ):
        self.env = env
        self.name = f"{name}@%h"
        # documented: started as the docs start one (mingle and gossip on), not quietened for speed
        self.extra_args = extra_args if documented else ("--without-mingle", "--without-gossip", *extra_args)
        self.log_path = Path(tempfile.mkstemp(prefix=f"kronos-worker-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-n", self.name, "-l", "info"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.extra_args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> "WorkerProcess":
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            text = self.log()
            if READY_LINE in text and "ready." in text:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM: Celery's warm shutdown."""
        os.kill(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group: no chance to ack, requeue or clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "WorkerProcess":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:  # __exit__ does not run when __enter__ raises
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_launcher(process: subprocess.Popen) -> None:
    """After a failed test: SIGTERM lets the launcher stop its worker; SIGKILL if it does not."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
