"""Forecast jobs through a real redis-server and a real `celery worker` process, checked against the engine."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from datetime import UTC, datetime, timedelta

import kronos_cases as kc
import numpy as np
import pandas as pd
import pytest
from redis_server import free_port
from worker_process import REPO_ROOT, producer_app, serving_env

from model import SeriesInput
from schemas import ForecastRequest, ForecastResult, JobFailed
from tasks.producer import submit
from tasks.routing import FORECAST_TASK

MAX_RETRIES = 2


@pytest.fixture(scope="module")
def env(server):
    return serving_env(
        server,
        KRONOS_MAX_RETRIES=str(MAX_RETRIES),
        KRONOS_MAX_BATCH_SIZE="8",
        KRONOS_PROGRESS_INTERVAL="0.001",
    )


@pytest.fixture(scope="module")
def app(env):
    """A producer's Celery app pointed at the test server (the import-time app reads this process's env)."""
    producer = producer_app(env)
    yield producer
    producer.close()


def request(start_row=0, lookback=64, pred_len=12, **options) -> ForecastRequest:
    frame = kc.candles().iloc[start_row : start_row + lookback]
    options.setdefault("series_id", f"series-{start_row}")
    return ForecastRequest.from_frame(frame, pred_len=pred_len, **options)


def direct(req: ForecastRequest):
    """The same forecast from the engine in this process, built from the candles, not the worker's code."""
    frame = kc.candles().set_index("timestamps").loc[req.candles.timestamps[0] : req.candles.timestamps[-1]]
    future = pd.date_range(frame.index[-1], periods=req.horizon + 1, freq="5min")[1:]  # the data's 5-minute step
    series = SeriesInput(
        candles=frame,
        future_timestamps=future,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        sample_count=req.sample_count,
        seed=req.seed,
        quantiles=req.quantiles,
    )
    return kc.engine().forecast([series])[0]


def meta(server, job_id) -> dict:
    raw = server.client(1).get(f"celery-task-meta-{job_id}")
    return json.loads(raw) if raw else {}


def test_results_match_the_engine_run_directly(worker, app):
    jobs = [
        request(0, 64, 12, top_k=1, top_p=1.0),
        request(300, 100, 20, sample_count=4, quantiles=[0.1, 0.5, 0.9], seed=11, temperature=0.8),
        request(900, 48, 8, top_p=0.5, seed=3),
    ]
    handles = [submit(job, celery_app=app) for job in jobs]
    for job, handle in zip(jobs, handles, strict=True):
        result = ForecastResult.model_validate(handle.get(timeout=60))
        expected = direct(job)
        got = result.to_frame()
        assert list(got.index) == list(expected.mean.index)
        np.testing.assert_allclose(got[list(expected.mean.columns)].to_numpy(), expected.mean.to_numpy(), rtol=1e-5)
        for q, frame in expected.quantiles.items():
            quantile_columns = [f"{c}_q{q}" for c in frame.columns]
            np.testing.assert_allclose(got[quantile_columns].to_numpy(), frame.to_numpy(), rtol=1e-5)
        assert result.job_id == handle.id and result.series_id == job.series_id
        assert result.worker.startswith("cpu@") and result.device == "cpu"
        assert result.model_id.endswith("predictor")
        assert job.seed is None or result.seed == job.seed
        assert result.timings.queue_wait is not None and result.timings.total >= result.timings.inference > 0


def test_results_are_plain_json_in_redis(worker, app, server):
    handle = submit(request(50, 40, 6), celery_app=app)
    handle.get(timeout=60)
    key = f"celery-task-meta-{handle.id}"
    stored = json.loads(server.client(1).get(key))  # what a service in any language reads
    assert stored["status"] == "SUCCESS" and stored["task_id"] == handle.id
    assert stored["result"]["series_id"] == "series-50" and len(stored["result"]["forecast"]["close"]) == 6
    assert 0 < server.client(1).ttl(key) <= 86400


def test_concurrent_jobs_share_batches(worker, app):
    handles = [submit(request(40 * i, 64, 16, seed=i), celery_app=app) for i in range(8)]
    sizes = [h.get(timeout=60)["batch_size"] for h in handles]
    assert max(sizes) > 1, f"no two jobs shared a batch: {sizes}"


def test_one_failing_job_fails_alone_in_its_batch(worker, app, server):
    good = [request(40 * i, 64, 16, seed=i) for i in range(5)]
    bad = request(700, 64, 16, series_id="fault:permanent")
    handles = [submit(job, celery_app=app) for job in [*good[:2], bad, *good[2:]]]
    results = []
    for handle in handles:
        try:
            results.append(handle.get(timeout=60))
        except JobFailed as failure:
            results.append(failure)
    failures = [r for r in results if isinstance(r, JobFailed)]
    assert len(failures) == 1 and failures[0].error.code == "INTERNAL"
    assert failures[0].error.job_id == handles[2].id
    assert meta(server, handles[2].id)["retries"] == MAX_RETRIES
    assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 2)


def test_transient_fault_is_retried_with_backoff_then_succeeds(worker, app, server):
    handle = submit(request(100, 64, 8, series_id="fault:transient:2"), celery_app=app)
    result = handle.get(timeout=60)
    assert result["series_id"] == "fault:transient:2"
    assert meta(server, handle.id)["retries"] == 2


def test_out_of_memory_splits_the_batch_and_every_job_succeeds(worker, app):
    jobs = [request(60 * i, 64, 10, series_id=f"fault:oom-above:1:{i}", seed=i) for i in range(6)]
    handles = [submit(job, celery_app=app) for job in jobs]
    assert all(h.get(timeout=60)["batch_size"] == 1 for h in handles)
    assert "out of memory at batch size" in worker.log()


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"series_id": "x"}, "candles"),
        ({**request().model_dump(mode="json"), "top_p": 1.5}, "top_p"),
        ({**request().model_dump(mode="json"), "pred_len": 100000}, "pred_len"),
        ({**request().model_dump(mode="json"), "unknown": 1}, "unknown"),
        ({**request().model_dump(mode="json"), "quantiles": [0.5]}, "quantiles"),
    ],
    ids=["no-candles", "top_p", "pred_len-limit", "unknown-field", "quantiles-one-sample"],
)
def test_invalid_input_fails_at_once_and_is_not_retried(worker, app, server, payload, field):
    started = time.monotonic()
    handle = app.send_task(FORECAST_TASK, args=[payload])
    with pytest.raises(JobFailed) as failure:
        handle.get(timeout=30)
    assert time.monotonic() - started < 5
    assert failure.value.error.code == "INVALID_INPUT" and failure.value.error.field.startswith(field)
    assert meta(server, handle.id)["retries"] == 0


def test_a_job_past_its_deadline_is_not_run(worker, app, server):
    job = request(0, 64, 8, deadline=datetime.now(UTC) - timedelta(seconds=1))
    handle = submit(job, celery_app=app)
    with pytest.raises(JobFailed) as failure:
        handle.get(timeout=30)
    assert failure.value.error.code == "EXPIRED" and failure.value.error.field == "deadline"
    assert meta(server, handle.id)["retries"] == 0


def test_a_deadline_that_passes_while_waiting_behind_a_long_batch(worker, app):
    blocker = submit(request(0, 64, 8, series_id="fault:sleep:2"), celery_app=app)
    time.sleep(0.5)  # the blocker's batch is running now
    late = submit(request(10, 64, 8, deadline=datetime.now(UTC) + timedelta(seconds=0.5)), celery_app=app)
    with pytest.raises(JobFailed) as failure:
        late.get(timeout=30)
    assert failure.value.error.code == "EXPIRED"
    assert blocker.get(timeout=30)["series_id"] == "fault:sleep:2"


def test_long_jobs_report_progress(worker, app, server):
    job = request(0, 64, 300, seed=1)
    states = []
    pubsub = server.client(1).pubsub()
    handle_id = "progress-job"
    pubsub.subscribe(f"celery-task-meta-{handle_id}")

    def listen():
        for message in pubsub.listen():
            if message["type"] == "message":
                body = json.loads(message["data"])
                states.append((body["status"], body["result"]))
                if body["status"] in ("SUCCESS", "FAILURE"):
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    submit(job.model_copy(update={"job_id": handle_id}), celery_app=app).get(timeout=60)
    listener.join(10)
    progress = [result for status, result in states if status == "PROGRESS"]
    assert progress, f"no PROGRESS state among {[s for s, _ in states]}"
    assert all(p["steps_total"] == 300 and 0 < p["steps_done"] < 300 for p in progress)
    assert [p["steps_done"] for p in progress] == sorted(p["steps_done"] for p in progress)


def test_celery_cli_sees_the_worker(worker, env):
    for command in (["status"], ["inspect", "active"], ["inspect", "registered"]):
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks.app", *command, "--timeout", "5"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "cpu@" in out.stdout
    assert FORECAST_TASK in out.stdout


def test_flower_shows_the_worker_and_requires_authentication(worker, env, app, tmp_path):
    submit(request(5, 40, 4), celery_app=app).get(timeout=60)
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", f"--port={port}", "--address=127.0.0.1",
         "--basic-auth=ops:secret"],
        # a state file of its own: Flower would otherwise list the workers another run saved
        env={**env, "KRONOS_FLOWER_DB": str(tmp_path / "flower.db")}, cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # the workers page's data, from the worker's events (Flower as the monitor, its default, inspects nothing)
        url = f"http://127.0.0.1:{port}/workers?json=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get_when_up(url, None)
        assert refused.value.code == 401
        until = time.monotonic() + 30
        while not any("cpu@" in json.dumps(worker) for worker in _flower_workers(url)):
            assert time.monotonic() < until, "Flower never saw the worker"
            time.sleep(0.5)
    finally:
        flower.terminate()
        flower.wait(10)


def _flower_workers(url: str) -> list:
    return json.loads(_get_when_up(url, b64encode(b"ops:secret").decode()))["data"]


def _get_when_up(url: str, token: str | None, timeout: float = 30) -> bytes:
    headers = {"Authorization": f"Basic {token}"} if token else {}
    until = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                return response.read()
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > until:
                raise
            time.sleep(0.3)


def test_the_model_was_loaded_once_for_all_jobs(worker):
    """Runs last in this module: every job above went through the same process and one model load."""
    log = worker.log()
    assert log.count("model loaded") == 1
    assert log.count("succeeded in") >= 20
