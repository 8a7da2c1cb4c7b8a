"""The Celery configuration on a real Redis: an embedded worker runs a task sent the way producers send it and
refuses pickle; and a first send with no Redis to reach fails within seconds."""

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celeryconfig_env import celery_config
from kombu.exceptions import OperationalError
from redis_server import free_port

from tasks.routing import FORECAST_TASK


@pytest.fixture
def kronos_test_app(celery_env: dict[str, str]) -> Iterator[Celery]:
    """A separate app configured exactly like ours against the test Redis, with a trivial task body
    registered under the real forecast task name."""
    app = Celery("kronos-e2e", set_as_current=False)
    # Keep pytest's log handlers: the embedded worker would otherwise strip the root logger's.
    app.config_from_object(dict(celery_config(celery_env), worker_hijack_root_logger=False))

    # shared=False: a shared task would also be registered on every app created later in the session.
    @app.task(name=FORECAST_TASK, shared=False)
    def echo_forecast(model: str, horizon: int) -> dict[str, Any]:
        return {"model": model, "horizon": horizon}

    yield app
    app.close()


def test_send_task_runs_on_the_worker_and_stores_plain_json(kronos_test_app: Celery) -> None:
    backend_url = kronos_test_app.conf.result_backend
    with start_worker(kronos_test_app, perform_ping_check=False, shutdown_timeout=30):
        result = kronos_test_app.send_task(FORECAST_TASK, kwargs={"model": "kronos-base", "horizon": 3})
        assert result.get(timeout=20) == {"model": "kronos-base", "horizon": 3}

    with redis.Redis.from_url(backend_url) as plain_client:
        raw = plain_client.get(f"celery-task-meta-{result.id}")
        ttl = plain_client.ttl(f"celery-task-meta-{result.id}")
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == {"model": "kronos-base", "horizon": 3}
    assert meta["task_id"] == result.id
    assert "args" not in meta and "kwargs" not in meta  # a result never copies the request
    assert 0 < ttl <= 86400


def test_worker_refuses_pickle_and_leaves_no_message_behind(kronos_test_app: Celery) -> None:
    broker = redis.Redis.from_url(kronos_test_app.conf.broker_url)
    with start_worker(kronos_test_app, perform_ping_check=False, shutdown_timeout=30):
        pickled = kronos_test_app.send_task(
            FORECAST_TASK, kwargs={"model": "kronos-small", "horizon": 1}, serializer="pickle"
        )
        # Same queue and priority, so the worker takes the pickled message first.
        plain = kronos_test_app.send_task(FORECAST_TASK, kwargs={"model": "kronos-small", "horizon": 2})
        assert plain.get(timeout=20) == {"model": "kronos-small", "horizon": 2}
        deadline = time.monotonic() + 10
        while broker.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert broker.hlen("unacked") == 0
    assert pickled.state == "PENDING"
    assert not any(broker.llen(key) for key in broker.keys("kronos.*"))
    broker.close()


def test_first_send_fails_fast_when_redis_is_down() -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    app = Celery("kronos-down-test", set_as_current=False)
    app.config_from_object(celery_config({"KRONOS_BROKER_URL": down}))
    started = time.monotonic()
    # The result backend subscribes before the broker publishes, so its error comes first.
    with pytest.raises((OperationalError, RuntimeError)):
        app.send_task(FORECAST_TASK, kwargs={"model": "kronos-small"})
    assert time.monotonic() - started < 15
    app.close()
