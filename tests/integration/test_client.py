"""The Python client (tasks/client.py) against a real redis-server and a real worker serving the fixture model."""

import json
import os
import subprocess
import sys

import kronos_cases as kc
import pandas as pd
import pytest
from kombu.exceptions import OperationalError as KombuOperationalError
from redis_server import free_port
from worker_process import REPO_ROOT, serving_env

from schemas import ErrorCode, ForecastResult
from tasks.client import (
    CandleDataError,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    JobTimeout,
    KronosClient,
    RedisUnavailable,
    priority_list,
    read_candles_csv,
)

UNSERVED_MODEL = "kronos-base"  # a queue no test worker consumes: jobs sent there stay queued


@pytest.fixture(scope="module")
def env(server):
    return serving_env(
        server,
        KRONOS_PROGRESS_INTERVAL="0.001",
    )


@pytest.fixture
def unserved_queue(server, client):
    """The unserved model's queue, emptied after the test."""
    queue = f"kronos.{UNSERVED_MODEL}"
    yield queue
    with server.client(0) as broker:
        broker.delete(*(priority_list(queue, priority) for priority in range(10)))


def candles(start_row: int = 0, lookback: int = 64) -> pd.DataFrame:
    return kc.candles().iloc[start_row : start_row + lookback]


def test_submit_returns_at_once_then_poll_wait_and_frame(worker, client):
    frame = candles(0, 64)
    job = client.submit(frame, series_id="s-0", pred_len=12, sample_count=4, quantiles=[0.1, 0.9], seed=3)
    assert not job.duplicate
    assert job.poll().state in {"PENDING", "STARTED", "PROGRESS", "SUCCESS"}

    result = job.wait(timeout=60)
    assert isinstance(result, ForecastResult)
    assert result.job_id == job.id and result.series_id == "s-0" and result.sample_count == 4
    status = job.poll()
    assert status.state == "SUCCESS" and status.finished and status.result == result and status.error is None
    assert job.state == "SUCCESS"
    assert job.result() == result

    forecast = job.frame()
    assert len(forecast) == 12 and forecast.index[0] > frame["timestamps"].iloc[-1]
    assert list(forecast.index) == list(pd.DatetimeIndex(result.timestamps))
    assert {"close", "volume", "close_q0.1", "close_q0.9"} <= set(forecast.columns)
    assert (forecast["close_q0.1"] <= forecast["close_q0.9"]).all()


def test_submit_a_csv_file_names_the_series_after_it(worker, client, tmp_path):
    path = tmp_path / "btc-5m.csv"
    candles(100, 80).to_csv(path, index=False)
    result = client.submit(path, pred_len=4).wait(timeout=60)
    assert result.series_id == "btc-5m" and len(result.timestamps) == 4


def test_submit_many_sends_one_job_per_series(worker, client):
    series = {f"many-{i}": candles(50 * i, 48) for i in range(3)}
    jobs = client.submit_many(series, pred_len=6, seed=1)
    assert len({job.id for job in jobs}) == 3
    assert [job.wait(timeout=60).series_id for job in jobs] == list(series)


def test_submit_many_sends_nothing_when_one_request_is_invalid(server, client, unserved_queue):
    bad = candles(0, 48).assign(high=0.0)  # below open and close
    with pytest.raises(JobFailed) as failure:
        client.submit_many([candles(0, 48), bad], pred_len=6, model=UNSERVED_MODEL)
    assert failure.value.error.code == "INVALID_INPUT" and failure.value.error.field == "candles.high"
    assert client.queue_depths()[unserved_queue] == 0


def test_another_process_fetches_the_job_by_id(worker, client, env):
    job = client.submit(candles(300, 64), pred_len=8, seed=5)
    fetch = (
        "import sys\n"
        "from tasks.client import KronosClient\n"
        "with KronosClient() as client:\n"
        "    print(client.job(sys.argv[1]).wait(timeout=60).model_dump_json())\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", fetch, job.id], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert ForecastResult.model_validate_json(completed.stdout) == job.wait(timeout=60)


def test_a_job_the_worker_rejects_raises_job_failed_with_its_error(worker, client):
    job = client.submit(candles(0, 64), pred_len=100_000)  # valid as a request, over the worker's limit
    with pytest.raises(JobFailed) as failure:
        job.wait(timeout=60)
    error = failure.value.error
    assert error.code == "INVALID_INPUT" and error.field == "pred_len" and error.job_id == job.id
    assert not error.retryable
    status = job.poll()
    assert status.state == "FAILURE" and status.error == error and status.result is None


def test_an_invalid_request_fails_before_anything_is_sent(server, client, unserved_queue):
    with pytest.raises(JobFailed) as failure:
        client.submit(candles(0, 64), pred_len=4, quantiles=[0.5], model=UNSERVED_MODEL)  # one path has no spread
    assert failure.value.error.code == "INVALID_INPUT" and failure.value.error.field == "quantiles"
    with pytest.raises(JobFailed) as unknown_model:
        client.submit(candles(0, 64), pred_len=4, model="kronos-huge")
    assert unknown_model.value.error.field == "model"
    assert client.queue_depths()[unserved_queue] == 0


def test_unknown_or_expired_ids_raise_job_not_found(worker, client, server):
    with pytest.raises(JobNotFound, match="no-such-job"):
        client.job("no-such-job")
    job = client.submit(candles(0, 64), pred_len=4)
    job.wait(timeout=60)
    with server.client(1) as results:  # what Redis does once the result and the job record expire
        results.delete(f"celery-task-meta-{job.id}", f"kronos:job:{job.id}")
    with pytest.raises(JobNotFound):
        job.poll()
    with pytest.raises(JobNotFound):
        client.job(job.id)


def test_a_queued_job_is_known_before_any_worker_has_seen_it(client, unserved_queue):
    job = client.submit(candles(0, 64), pred_len=4, model=UNSERVED_MODEL)
    assert client.job(job.id).poll().state == "PENDING"
    with pytest.raises(JobTimeout) as timeout:
        job.wait(timeout=0.3)
    assert timeout.value.job_id == job.id and timeout.value.status.state == "PENDING"
    assert "did not finish within 0.3 s (it is queued)" in str(timeout.value)


def test_wait_times_out_then_the_job_still_finishes(worker, client):
    job = client.submit(candles(0, 64), series_id="fault:sleep:2", pred_len=4)
    with pytest.raises(JobTimeout):
        job.wait(timeout=0.5)
    assert job.wait(timeout=60).series_id == "fault:sleep:2"


def test_resubmitting_a_queued_job_id_sends_no_second_message(server, client, unserved_queue):
    first = client.submit(candles(0, 64), pred_len=4, job_id="dedupe-queued", model=UNSERVED_MODEL)
    again = client.submit(candles(0, 64), pred_len=4, job_id="dedupe-queued", model=UNSERVED_MODEL)
    assert not first.duplicate and again.duplicate and again.id == first.id
    assert client.queue_depths()[unserved_queue] == 1


def test_resubmitting_a_finished_job_id_runs_nothing_again(worker, client):
    first = client.submit(candles(0, 64), pred_len=4, job_id="dedupe-done")
    result = first.wait(timeout=60)
    again = client.submit(candles(0, 64), pred_len=4, job_id="dedupe-done")  # the same request: the same job
    assert again.duplicate
    assert again.wait(timeout=10) == result
    with pytest.raises(JobIdConflict) as conflict:  # another request under that id: refused, nothing sent
        client.submit(candles(64, 64), pred_len=8, job_id="dedupe-done")
    assert conflict.value.error.code == ErrorCode.JOB_ID_CONFLICT
    assert client.job("dedupe-done").wait(timeout=10) == result
    assert worker.log().count("kronos.forecast[dedupe-done] received") == 1


def test_a_failed_send_leaves_the_id_free_for_a_retry(client, unserved_queue, monkeypatch):
    def broker_down(*args, **kwargs):  # what kombu raises when the broker refuses the connection
        raise KombuOperationalError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    monkeypatch.setattr("tasks.client.send_job", broker_down)
    with pytest.raises(RedisUnavailable, match="set KRONOS_BROKER_URL"):
        client.submit(candles(0, 64), pred_len=4, job_id="retry-me", model=UNSERVED_MODEL)
    monkeypatch.undo()
    assert not client.submit(candles(0, 64), pred_len=4, job_id="retry-me", model=UNSERVED_MODEL).duplicate
    assert client.queue_depths()[unserved_queue] == 1


def test_progress_bar_advances_on_stderr(worker, client, capsys):
    client.submit(candles(0, 64), pred_len=300, seed=1).wait(timeout=60, progress=True)
    drawn = capsys.readouterr().err
    steps = [int(segment.split("] ")[1].split("/")[0]) for segment in drawn.split("\r") if "/300 steps" in segment]
    assert len(set(steps)) >= 3, drawn
    assert steps == sorted(steps) and steps[-1] == 300
    assert drawn.endswith("\n")


def test_workers_and_queue_depths_over_priority_lists(worker, client, server, unserved_queue):
    [heartbeat] = client.workers()
    assert heartbeat.worker.startswith("cpu@") and heartbeat.ready and heartbeat.model == "kronos-small"
    for priority in (0, 3, 9):
        client.submit(candles(0, 64), pred_len=4, model=UNSERVED_MODEL, priority=priority)
    with server.client(0) as broker:
        assert [broker.llen(priority_list(unserved_queue, p)) for p in (0, 3, 9)] == [1, 1, 1]
        assert broker.exists(unserved_queue + "\x06\x163")  # the key kombu itself reads
    assert client.queue_depths()[unserved_queue] == 3


def test_redis_down_is_one_clear_error_without_the_password():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with KronosClient(url) as unreachable:
        with pytest.raises(RedisUnavailable) as down:
            unreachable.submit(candles(0, 64), pred_len=4)
        with pytest.raises(RedisUnavailable):
            unreachable.job("any")
    message = str(down.value)
    assert message.startswith("cannot reach Redis at redis://127.0.0.1:") and "hunter2" not in message
    assert message.endswith("is it running? set KRONOS_BROKER_URL")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a,b\n1,2\n", "no timestamp column"),
        ("timestamps,open,high,low\n2024-01-01 00:00,1,2,0.5\n", "missing column(s) close"),
        ("timestamps,open,high,low,close\n2024-01-01 00:00,1,2,0.5,1\nsoon,1,2,0.5,1\n", "line 3: timestamps 'soon'"),
        ("timestamps,open,high,low,close\n2024-01-01 00:00,1,2,0.5,n/a!\n", "line 2: close 'n/a!' is not a number"),
        ("", "not a readable CSV file"),
    ],
    ids=["no-timestamps", "missing-column", "bad-timestamp", "not-a-number", "empty"],
)
def test_unreadable_candle_files_say_what_and_where(tmp_path, text, problem):
    path = tmp_path / "candles.csv"
    path.write_text(text)
    with pytest.raises(CandleDataError) as failure:
        read_candles_csv(path)
    assert str(failure.value).startswith(f"{path}: ") and problem in str(failure.value)


def test_client_and_cli_import_no_torch_and_no_worker_code():
    probe = (
        "import sys, tasks.client, tasks.cli, tasks.plot\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'worker', 'model', 'matplotlib'})\n"
        "assert not heavy, heavy\n"
    )
    environment = {name: value for name, value in os.environ.items() if not name.startswith("KRONOS_")}
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr


def test_job_status_json_is_plain_json(worker, client):
    job = client.submit(candles(0, 64), pred_len=4)
    job.wait(timeout=60)
    document = json.loads(json.dumps(job.poll().to_json()))
    assert document["state"] == "SUCCESS" and document["result"]["job_id"] == job.id and document["error"] is None
