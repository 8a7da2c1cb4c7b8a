"""Fixtures shared by the whole test suite, and the tier markers of its two folders."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, strict_json_violations

# The tests run tiny checkpoints: one intra-op thread is fastest and keeps a 2-core machine responsive
# (read by torch when it is first imported, and inherited by worker subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
# Each folder is a tier, selected with `python -m pytest -m unit` or `-m integration` (README, Tests).
TIERS = ("unit", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test with the tier of its folder, so that a test cannot leave a tier's selection by
    forgetting a marker. A test module outside both folders is an error: it would silently run in neither."""
    for item in items:
        path = item.path.resolve()
        if not path.is_relative_to(TESTS):  # a test file named on the command line from elsewhere
            continue
        tier = path.relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: test modules go in tests/unit or tests/integration")
        item.add_marker(tier)


@pytest.fixture(scope="session", autouse=True)
def results_are_strict_json() -> Iterator[None]:
    """Every result document any test's Redis held when it closed parses with a strict JSON parser (RFC 8259),
    as other languages' parsers (Node's JSON.parse) require."""
    yield
    assert not strict_json_violations, strict_json_violations[:10]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (no persistence); tests that restart or kill a server
    start their own RedisServer."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server of the test module's own, for modules that run a worker against it."""
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def worker(env: dict[str, str]):
    """A real worker process on the module's `server`, configured by the module's own `env` fixture."""
    # imported here: the harness loads torch, which must see OMP_NUM_THREADS set above
    from worker_process import WorkerProcess

    with WorkerProcess(env) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: RedisServer):
    """The Python producer client on the module's `server`."""
    from tasks.client import KronosClient

    with KronosClient(server.url(0), server.url(1)) as kronos:
        yield kronos


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """DB 0 of the session server, emptied (all DBs) before the test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url(0)


@pytest.fixture
def celery_env(redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment for a worker subprocess pointed at the session server: broker on DB 0, results on
    DB 1. Also applied to os.environ for the test's duration."""
    monkeypatch.setenv("KRONOS_BROKER_URL", redis_url)
    monkeypatch.setenv("KRONOS_RESULT_BACKEND", redis_server.url(1))
    # Subprocesses started from elsewhere still import celeryconfig and tasks from this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return dict(os.environ)
