"""The test suite's process harness, shared by the benchmarks that run real Redis and worker processes.

tests/redis_server.py (a throwaway redis-server on a free port) and tests/worker_process.py (a real
`celery -A worker.app worker` subprocess) live beside the tests, which import them as top-level modules;
this puts tests/ on the path once so that bench modules import them by name.
"""

import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import kronos_cases  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from worker_process import WorkerProcess, producer_app, worker_env  # noqa: E402

__all__ = [
    "REPO",
    "RedisServer",
    "WorkerProcess",
    "code_version",
    "cpu_model",
    "kronos_cases",
    "proc_status_kib",
    "producer_app",
    "rss_kib",
    "worker_env",
]


def proc_status_kib(pid: int, field: str) -> int | None:
    """A KiB field of /proc/<pid>/status (VmRSS, VmHWM, ...); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def rss_kib(pid: int) -> int | None:
    return proc_status_kib(pid, "VmRSS")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version(paths: tuple[str, ...] = ("model",)) -> dict:
    """The commit measured, and whether the files under `paths` (the engine's, unless told) differed from it
    (read-only git calls)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", *paths)
    return {"commit": git("rev-parse", "HEAD"), "changes_uncommitted": changed.splitlines() if changed else []}
