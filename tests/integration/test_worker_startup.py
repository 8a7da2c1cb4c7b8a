"""A worker that cannot load its model takes no job and says why; a healthy one then serves the queue."""

import os

import kronos_cases as kc
import pytest
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, producer_app, worker_env

from schemas import HEARTBEAT_KEY, ForecastRequest
from tasks.producer import submit

QUEUE = "kronos.kronos-small"


def queued(server: RedisServer) -> int:
    """Messages waiting in the queue, over kombu's per-priority lists (`<queue>\\x06\\x16<priority>`)."""
    client = server.client(0)
    return sum(client.llen(QUEUE if p == 0 else f"{QUEUE}\x06\x16{p}") for p in range(10))


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"KRONOS_PREDICTOR": "/nonexistent/checkpoint"}, "not a Hub repo id"),
        ({"KRONOS_PREDICTOR": "NeoQuasar/Kronos-small", "HF_HUB_OFFLINE": "1"}, "not in the local Hugging Face cache"),
        ({"KRONOS_DEVICE": "cuda:7"}, "device 'cuda:7'"),
    ],
    ids=["missing-dir", "offline-hub", "no-such-gpu"],
)
def test_worker_that_cannot_load_its_model_exits_without_taking_jobs(tmp_path, overrides, reason):
    with RedisServer() as server:
        env = worker_env(
            dict(os.environ),
            KRONOS_BROKER_URL=server.url(0),
            KRONOS_RESULT_BACKEND=server.url(1),
            PYTHONPATH=str(REPO_ROOT),
            HF_HOME=str(tmp_path / "hf"),
            **overrides,
        )
        producer = producer_app(env)
        frame = kc.candles().iloc[:64]
        job = submit(ForecastRequest.from_frame(frame, series_id="waits", pred_len=4), celery_app=producer)
        assert queued(server) == 1

        sick = WorkerProcess(env, name="sick").start()
        try:
            assert sick.wait_exit(60) == 3
        finally:
            sick.stop()  # if it did not exit
        assert "cannot load model" in sick.log() and reason in sick.log()
        assert queued(server) == 1, "the job must stay queued"
        assert job.state == "PENDING"

        healthy_env = {k: v for k, v in worker_env(env).items() if k not in ("HF_HUB_OFFLINE",)}
        with WorkerProcess(healthy_env, name="healthy"):
            assert job.get(timeout=60)["series_id"] == "waits"
        producer.close()


def test_a_worker_compiles_its_decode_step_before_it_takes_a_job():
    """Other tests' workers skip the compile (TORCH_COMPILE_DISABLE, tests/worker_process.py); this one loads as
    a deployment does: the heartbeat names the compiled decode path, and the first job is served by it."""
    with RedisServer() as server:
        env = worker_env(
            {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"},
            KRONOS_BROKER_URL=server.url(0), KRONOS_RESULT_BACKEND=server.url(1), PYTHONPATH=str(REPO_ROOT),
        )  # fmt: skip
        env.pop("TORCH_COMPILE_DISABLE")
        app = producer_app(env)
        worker = WorkerProcess(env, name="compiled")
        try:
            worker.start().wait_ready(timeout=240)  # the compile is part of the load
            heartbeat = next(iter(server.client(0).hgetall(HEARTBEAT_KEY).values()))
            assert '"decode_path": "compiled' in heartbeat.decode(), heartbeat
            request = ForecastRequest.from_frame(kc.candles().iloc[:48], series_id="first", pred_len=4, freq="5min")
            assert len(submit(request, celery_app=app).get(timeout=60)["forecast"]["close"]) == 4
        finally:
            worker.stop()
            app.close()
