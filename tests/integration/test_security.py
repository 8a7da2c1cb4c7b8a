"""Nothing in a message can run code: workers and result readers accept JSON only."""

import base64
import json
import os
import pickle
import time
import uuid

import pytest
from celery import Celery
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, worker_env

from tasks.routing import FORECAST_TASK

QUEUE = "kronos.kronos-small"


class WritesMarker:
    """Unpickling this calls os.system: what an attacker with write access to Redis would send."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def envelope(job_id: str, body: bytes, content_type: str, queue: str = QUEUE) -> str:
    """A well-formed Celery message (protocol 2) as a hostile producer would push it straight onto the queue;
    `queue` is the route it claims."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary" if content_type != "application/json" else "utf-8",
            "content-type": content_type,
            "headers": {"lang": "py", "task": FORECAST_TASK, "id": job_id, "root_id": job_id, "retries": 0},
            "properties": {
                "correlation_id": job_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": queue, "routing_key": queue},
                "priority": 5,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def pickle_envelope(job_id: str, body: bytes, queue: str = QUEUE) -> str:
    return envelope(job_id, body, "application/x-python-serialize", queue)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    job_id = str(uuid.uuid4())
    with RedisServer() as server:
        env = worker_env(
            dict(os.environ), KRONOS_BROKER_URL=server.url(0), KRONOS_RESULT_BACKEND=server.url(1),
            PYTHONPATH=str(REPO_ROOT),
        )  # fmt: skip
        payload = pickle.dumps(((WritesMarker(marker),), {}, {}))
        with WorkerProcess(env) as worker:
            server.client(0).lpush(f"{QUEUE}\x06\x165", pickle_envelope(job_id, payload))
            until = time.monotonic() + 30
            while not server.client(1).exists(f"celery-task-meta-{job_id}") and time.monotonic() < until:
                time.sleep(0.1)
            assert worker.process.poll() is None
            # refused by admission before Celery could even try to deserialize it
            assert "the content type is not application/json" in worker.log()
        stored = json.loads(server.client(1).get(f"celery-task-meta-{job_id}"))
        assert stored["status"] == "FAILURE"
        assert stored["result"]["exc_message"][0]["code"] == "INVALID_INPUT"
        assert not marker.exists()


def test_a_pickled_result_planted_in_redis_is_not_deserialized_by_a_producer(tmp_path):
    marker = tmp_path / "pwned"
    with RedisServer() as server:
        producer = Celery("producer")
        producer.config_from_object("celeryconfig")
        producer.conf.update(broker_url=server.url(0), result_backend=server.url(1))
        job_id = str(uuid.uuid4())
        planted = pickle.dumps({"status": "SUCCESS", "result": WritesMarker(marker), "task_id": job_id})
        server.client(1).set(f"celery-task-meta-{job_id}", planted)
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
            producer.AsyncResult(job_id).get(timeout=5)
        producer.close()
        server.client(1).delete(f"celery-task-meta-{job_id}")  # planted, not a result: out of the JSON check
    assert not marker.exists()
