"""A real worker's /metrics while it serves jobs, its JSON log lines, and the metric pieces on their own."""

import json
import time
import urllib.request

import kronos_cases as kc
import pytest
from celery import Celery
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, free_port
from worker_process import serving_env

from schemas import ErrorCode, ForecastRequest, JobFailed
from tasks.producer import submit
from tasks.routing import PRIORITY_STEPS
from tasks.settings import SettingsError
from worker.metrics import PHASES, QueueDepthCollector, WorkerMetrics
from worker.settings import load_worker_settings

QUEUE = "kronos.kronos-small"
CONCURRENCY = 2  # two jobs held at a time, so that later ones wait in Redis where queue depth counts them


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def env(server, port):
    return serving_env(
        server,
        KRONOS_METRICS_PORT=str(port),
        KRONOS_METRICS_ADDRESS="127.0.0.1",
        KRONOS_CONCURRENCY=str(CONCURRENCY),
        KRONOS_MAX_BATCH_SIZE="4",
        KRONOS_MAX_RETRIES="1",
        KRONOS_HEARTBEAT_INTERVAL="1",
    )


@pytest.fixture(scope="module")
def app(env):
    producer = Celery("kronos-producer")
    producer.config_from_object("celeryconfig")
    producer.conf.update(broker_url=env["KRONOS_BROKER_URL"], result_backend=env["KRONOS_RESULT_BACKEND"])
    yield producer
    producer.close()


def request(start_row=0, pred_len=8, **options) -> ForecastRequest:
    options.setdefault("series_id", f"series-{start_row}")
    return ForecastRequest.from_frame(kc.candles().iloc[start_row : start_row + 64], pred_len=pred_len, **options)


def scrape(port: int) -> dict[str, list]:
    """Sample name -> [(labels, value)] from the worker's endpoint, parsed as Prometheus parses it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name, **labels) -> float:
    matching = [v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items()]
    assert len(matching) == 1, f"{name}{labels}: {samples.get(name)}"
    return matching[0]


def wait_for(port, predicate, timeout=30):
    until = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples) or time.monotonic() > until:
            return samples
        time.sleep(0.1)


def outcome(handle, timeout=60):
    try:
        return handle.get(timeout=timeout)
    except JobFailed as failure:
        return failure


def test_metrics_count_the_jobs_run_and_see_the_queue(worker, app, port):
    # While one job sleeps in its batch and another waits for the next, the rest stay in Redis, one job on
    # each of three priority steps (three separate lists): queue depth must count all of them.
    sleeper = submit(request(0, series_id="fault:sleep:4"), celery_app=app)
    second = submit(request(10), celery_app=app)
    busy = wait_for(port, lambda s: value(s, "kronos_jobs_in_flight") == CONCURRENCY)
    assert value(busy, "kronos_jobs_in_flight") == CONCURRENCY
    waiting = [submit(request(20 + i), priority=priority, celery_app=app) for i, priority in enumerate((0, 5, 9))]
    backlog = wait_for(port, lambda s: value(s, "kronos_queue_depth", queue=QUEUE) == 3)
    assert value(backlog, "kronos_queue_depth", queue=QUEUE) == 3

    together = [submit(request(100 + 10 * i, pred_len=12, sample_count=2), celery_app=app) for i in range(4)]
    transient = submit(request(60, series_id="fault:transient:1"), celery_app=app)
    invalid = app.send_task("kronos.forecast", args=[{"series_id": "no-candles"}], queue=QUEUE)
    permanent = submit(request(70, series_id="fault:permanent"), celery_app=app)

    succeeded = [sleeper, second, *waiting, *together, transient]
    results = [handle.get(timeout=60) for handle in succeeded]
    for failing, code in ((invalid, "INVALID_INPUT"), (permanent, "INTERNAL")):
        with pytest.raises(JobFailed) as failure:
            failing.get(timeout=60)
        assert failure.value.error.code == code

    samples = wait_for(port, lambda s: value(s, "kronos_jobs_total", state="failed", code="INTERNAL") == 1)
    assert value(samples, "kronos_jobs_total", state="succeeded", code="") == len(succeeded)
    assert value(samples, "kronos_jobs_total", state="failed", code="INVALID_INPUT") == 1
    assert value(samples, "kronos_jobs_total", state="failed", code="INTERNAL") == 1
    assert sum(v for labels, v in samples["kronos_jobs_total"] if labels["state"] == "failed") == 2
    # fault:transient:1 failed once, fault:permanent once before its only retry was spent
    assert value(samples, "kronos_job_retries_total", code="INTERNAL") == 2
    assert value(samples, "kronos_jobs_in_flight") == 0
    assert value(samples, "kronos_queue_depth", queue=QUEUE) == 0

    # The histograms hold exactly the timings the results report.
    for phase in PHASES:
        timings = [result["timings"][phase] for result in results]
        assert value(samples, "kronos_job_seconds_count", phase=phase) == len(succeeded), phase
        assert value(samples, "kronos_job_seconds_sum", phase=phase) == pytest.approx(sum(timings)), phase
        for le in ("0.1", "1.0", "2.5"):
            below = sum(seconds <= float(le) for seconds in timings)
            assert value(samples, "kronos_job_seconds_bucket", phase=phase, le=le) == below, (phase, le)
    assert any(result["timings"]["inference"] >= 4 for result in results)  # the sleeper's batch

    # Every succeeded attempt ran in exactly one successful engine call; failed attempts in none.
    sizes = [result["batch_size"] for result in results]
    batches = round(sum(1 / size for size in sizes))
    assert value(samples, "kronos_batch_size_count") == batches == value(samples, "kronos_batch_seconds_count")
    assert value(samples, "kronos_batch_size_sum") == len(succeeded)
    assert value(samples, "kronos_batch_size_bucket", le="1.0") == sizes.count(1)
    assert max(sizes) > 1
    steps = sum(len(result["timestamps"]) * result["sample_count"] for result in results)
    assert value(samples, "kronos_generated_steps_total") == steps == 8 * 6 + 12 * 2 * 4

    (loaded,) = samples["kronos_model_loaded"]
    assert loaded == ({"model": "kronos-small", "model_id": str(kc.PARITY / "predictor"), "revision": "",
                       "device": "cpu"}, 1)  # fmt: skip
    assert 0 < value(samples, "kronos_model_load_seconds") < 60
    assert value(samples, "kronos_worker_ready", queue=QUEUE, model="kronos-small") == 1
    rss = value(samples, "process_resident_memory_bytes")
    assert 50e6 < rss <= value(samples, "kronos_process_peak_rss_bytes")
    assert value(samples, "process_start_time_seconds") < time.time()
    assert "kronos_gpu_memory_allocated_bytes" not in samples  # a CPU worker has no GPU gauges


def test_probes_answer_on_the_metrics_port(worker, port):
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            assert response.status == 200 and response.read() == b"ok\n"


def test_every_finished_job_has_one_json_log_line(worker, app):
    good = submit(request(300, series_id="logged-series"), celery_app=app)
    retried = submit(request(310, series_id="fault:transient:1"), celery_app=app)
    invalid = app.send_task("kronos.forecast", args=[{"series_id": "logged-invalid"}], queue=QUEUE)
    good.get(timeout=60)
    retried.get(timeout=60)
    with pytest.raises(JobFailed):
        invalid.get(timeout=60)
    time.sleep(0.5)  # a job's log line may follow its stored result by a moment
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert lines and all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)

    def job_lines(job_id):
        return [line for line in lines if line.get("job_id") == job_id and line.get("state")]

    (line,) = job_lines(good.id)
    assert line["state"] == "succeeded" and line["series_id"] == "logged-series" and line["level"] == "INFO"
    assert line["model"] == "kronos-small" and line["worker"].startswith("cpu@")
    assert isinstance(line["batch_id"], int) and line["batch_size"] >= 1
    assert set(line["timings"]) == set(PHASES) and line["timings"]["total"] > 0
    assert [(entry["state"], entry.get("code")) for entry in job_lines(retried.id)] == [
        ("retry", "INTERNAL"),
        ("succeeded", None),
    ]
    (failed,) = job_lines(invalid.id)
    assert failed["state"] == "failed" and failed["code"] == "INVALID_INPUT" and failed["level"] == "WARNING"
    assert failed["series_id"] == "logged-invalid" and failed["error"]["field"] == "candles"
    # Celery's own line about a job carries its id too, taken from the running task
    trace = [entry for entry in lines if entry["logger"] == "celery.app.trace" and good.id in entry["message"]]
    assert trace and trace[0]["job_id"] == good.id


def test_queue_depth_counts_every_priority_step_and_survives_redis_down():
    with RedisServer() as own:
        client = own.client(0, socket_timeout=2, socket_connect_timeout=2)
        producer = Celery("kronos-producer")
        producer.config_from_object("celeryconfig")
        producer.conf.update(broker_url=own.url(0), result_backend=own.url(1))
        for priority in (0, 0, 3, 9):  # kombu puts these on three different Redis lists
            producer.send_task("kronos.forecast", args=[{}], queue=QUEUE, priority=priority)
        producer.close()
        collector = QueueDepthCollector(client, [QUEUE, "kronos.kronos-base"], PRIORITY_STEPS)
        client.zadd("kronos:delayed", {"a": 1, "b": 2})  # two jobs waiting for their eta (worker/delayed.py)
        family, delayed = collector.collect()
        assert {s.labels["queue"]: s.value for s in family.samples} == {QUEUE: 4, "kronos.kronos-base": 0}
        assert (delayed.name, [s.value for s in delayed.samples]) == ("kronos_delayed_jobs", [2])
        assert len(client.keys(f"{QUEUE}*")) == 3
        own.stop()
        assert list(collector.collect()) == []  # no sample, and no exception that would fail the whole scrape


def test_a_job_that_fails_for_good_is_counted_once_and_leaves_flight():
    metrics = WorkerMetrics("kronos-small", [QUEUE], CollectorRegistry())

    def body(self):
        """Never run: the task only carries a request, as in a pool thread."""

    task = Celery("unit").task(name="unit", bind=True)(body)
    task.push_request(id="job-1", hostname="cpu@test", retries=0)
    metrics.job_started(task)
    assert metrics.job_counts() == (1, 0)
    metrics.job_failed(task, {}, JobFailed.of(ErrorCode.TIMEOUT, "no result").error, will_retry=False)
    assert metrics.job_counts() == (0, 1)
    labels = {"model": "kronos-small", "state": "failed", "code": "TIMEOUT"}
    assert metrics.registry.get_sample_value("kronos_jobs_total", labels) == 1
    assert metrics.registry.get_sample_value("kronos_jobs_in_flight", {"model": "kronos-small"}) == 0


@pytest.mark.parametrize(
    "device, base, port",
    [
        ("cpu", None, 9808),
        ("cuda:0", "9900", 9900),
        ("cuda:3", "9900", 9903),
        ("auto", "9900", 9900),
        ("cuda:2", "0", 0),
    ],
)
def test_each_gpu_process_gets_its_own_metrics_port(device, base, port):
    environ = {"KRONOS_DEVICE": device} | ({"KRONOS_METRICS_PORT": base} if base else {})
    assert load_worker_settings(environ).metrics_port == port


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({"KRONOS_METRICS_PORT": "65535", "KRONOS_DEVICE": "cuda:1"}, "KRONOS_METRICS_PORT"),
        ({"KRONOS_METRICS_PORT": "-1"}, "KRONOS_METRICS_PORT"),
        ({"KRONOS_LOG_FORMAT": "xml"}, "KRONOS_LOG_FORMAT"),
        ({"KRONOS_HEARTBEAT_INTERVAL": "0"}, "KRONOS_HEARTBEAT_INTERVAL"),
    ],
)
def test_bad_observability_settings_name_their_variable(environ, variable):
    with pytest.raises(SettingsError, match=variable):
        load_worker_settings(environ)
