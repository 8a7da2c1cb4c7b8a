"""Prometheus metrics of one worker process, served over HTTP together with its health probes.

Each worker process serves its own `/metrics` on KRONOS_METRICS_PORT (plus its GPU index, so the processes
the launcher starts on one host get distinct ports). One process holds the model, the batching thread
and every pool thread (`-P threads`), so every count lives in this process's memory: prometheus-client's
plain registry sees all of it, and its multiprocess mode, which exists for prefork children that each see
a share of the jobs, is not needed (and would forbid the scrape-time collectors below).

Per-task runtimes and worker online status as Celery events tell them are Flower's `/metrics`; these
metrics add what events cannot see: the phases of a job, batches, the model, memory and queue depth.
"""

import logging
import resource
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import redis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from schemas import ErrorCode, ForecastResult, JobError
from tasks.keys import DELAYED_KEY
from worker.batching import BatchRun
from worker.jobs import JobObserver
from worker.memory import AdaptiveBatchLimit

log = logging.getLogger(__name__)

# From a 10 ms preprocessing step to KRONOS_MAX_JOB_SECONDS' default of 10 minutes.
JOB_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PHASES = ("queue_wait", "preprocess", "batch_wait", "inference", "total")
# The Redis transport separates a queue's name from its priority step with this (kombu.transport.redis).
PRIORITY_SEPARATOR = "\x06\x16"
DELAYED_HELP = "Jobs whose eta is still ahead, waiting in Redis (all queues), read at scrape time."
# cgroup v1 reports "no limit" as a number near 2**63 instead of "max".
_UNLIMITED = 2**62
_CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class WorkerMetrics(JobObserver):
    """Every metric of this process on its own registry; a JobObserver for jobs, `batch_done` for batches.

    It also keeps the two job counts the heartbeat reports (`jobs_in_flight`, `jobs_done`).
    """

    def __init__(self, model: str, queues: Sequence[str], registry: CollectorRegistry | None = None):
        self.model = model
        self.queues = list(queues)  # one per producer served (tasks/routing.py), or the model's shared queue
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(ProcessMemoryCollector())
        on = {"registry": self.registry}
        self.jobs = Counter(
            "kronos_jobs", "Jobs finished, by final state and error code.", ["model", "state", "code"], **on
        )
        self.retries = Counter("kronos_job_retries", "Attempts sent back for a retry.", ["model", "code"], **on)
        self.job_seconds = Histogram(
            "kronos_job_seconds",
            "Seconds a succeeded job spent in each phase: queue_wait (enqueue to start), preprocess, "
            "batch_wait, inference (its batch's engine call) and total (enqueue to result).",
            ["model", "phase"],
            buckets=JOB_SECONDS_BUCKETS,
            **on,
        )
        self.batch_size = Histogram(
            "kronos_batch_size", "Jobs per engine call.", ["model"], buckets=BATCH_SIZE_BUCKETS, **on
        )
        self.batch_seconds = Histogram(
            "kronos_batch_seconds", "Seconds per engine call.", ["model"], buckets=JOB_SECONDS_BUCKETS, **on
        )
        self.generated_steps = Counter(
            "kronos_generated_steps",
            "Candles generated: horizon x sample paths of each succeeded job (rate() = steps per second).",
            ["model"],
            **on,
        )
        self.in_flight = Gauge("kronos_jobs_in_flight", "Jobs being run by this process now.", ["model"], **on)
        self.load_seconds = Gauge("kronos_model_load_seconds", "Seconds the model took to load.", ["model"], **on)
        self.model_loaded = Gauge(
            "kronos_model_loaded",
            "1 for the model this process serves, with where it came from.",
            ["model", "model_id", "revision", "device"],
            **on,
        )
        self.ready = Gauge(
            "kronos_worker_ready",
            "1 when this process takes jobs (model loaded, consumer started, Redis answering).",
            ["model", "queue"],
            **on,
        )
        self.model_updates = Counter(
            "kronos_model_updates",
            "Model updates (kronos_load_model) by outcome: serving (switched) or failed (old model kept).",
            ["model", "outcome"],
            **on,
        )
        self.circuit_open = Gauge(
            "kronos_circuit_open",
            "1 while the circuit breaker keeps this process off its queue after consecutive internal failures.",
            ["model"],
            **on,
        )
        self.quota_exceeded = Counter(
            "kronos_quota_exceeded",
            "Jobs over their producer's quota (KRONOS_QUOTA_*), by action: rejected (RATE_LIMITED) or delayed.",
            ["model", "producer", "action"],
            **on,
        )
        self.jobs_not_run = Counter(
            "kronos_jobs_not_run",
            "Deliveries of a job that did not run (worker/claims.py), by reason: final (its answer was stored), "
            "held (another run holds it; this copy comes back later) or conflict (its id names another request).",
            ["model", "reason"],
            **on,
        )
        self.takeovers = Counter(
            "kronos_job_takeovers",
            "Runs of a job that took over from a run whose lease lapsed (its worker died or lost Redis): the "
            "model ran that job a second time.",
            ["model"],
            **on,
        )
        self.messages_refused = Counter(
            "kronos_messages_refused",
            "Messages taken off a queue and not run (worker/admission.py): a foreign job id, another task, "
            "follow-up work or a far eta; each is kept in kronos:poison.",
            ["model", "queue"],
            **on,
        )
        # Present from the start, so rate() and error ratios read 0 rather than nothing before the first event.
        self.jobs.labels(model, "succeeded", "")
        for code in ErrorCode:
            self.jobs.labels(model, "failed", code.value)
        self.in_flight.labels(model).set(0)
        for reason in ("final", "held", "conflict"):
            self.jobs_not_run.labels(model, reason)
        self.takeovers.labels(model)
        for queue in self.queues:
            self.messages_refused.labels(model, queue)
        for outcome in ("serving", "failed"):
            self.model_updates.labels(model, outcome)
        self._lock = threading.Lock()
        self._running = 0
        self._done = 0

    def watch_readiness(self, is_ready: Callable[[], bool]) -> None:
        for queue in self.queues:  # per queue, so an alert names the producer's queue that nobody serves
            self.ready.labels(self.model, queue).set_function(lambda: 1 if is_ready() else 0)

    def watch_queue_depth(self, client: redis.Redis, priority_steps: Sequence[int]) -> None:
        self.registry.register(QueueDepthCollector(client, self.queues, priority_steps))

    def record_model(self, model_id: str, revision: str | None, device: torch.device, load_seconds: float) -> None:
        self._model_labels = (self.model, model_id, revision or "", str(device))
        self.model_loaded.labels(*self._model_labels).set(1)
        self.load_seconds.labels(self.model).set(load_seconds)
        if device.type == "cuda":
            self.registry.register(GpuMemoryCollector(device))

    def model_switched(self, model_id: str, revision: str | None) -> None:
        """A rolling update replaced the served engine (on the same device): only the new one is loaded."""
        _, _, _, device = self._model_labels
        self.model_loaded.remove(*self._model_labels)
        self._model_labels = (self.model, model_id, revision or "", device)
        self.model_loaded.labels(*self._model_labels).set(1)

    def job_over_quota(self, task, producer: str, action: str) -> None:
        self.quota_exceeded.labels(self.model, producer, action).inc()

    def message_refused(self, queue: str, _reason: str) -> None:
        self.messages_refused.labels(self.model, queue).inc()

    def model_update_finished(self, outcome: str) -> None:
        self.model_updates.labels(self.model, outcome).inc()

    def watch_circuit(self, is_open: Callable[[], bool]) -> None:
        self.circuit_open.labels(self.model).set_function(lambda: 1 if is_open() else 0)

    def watch_batch_limit(self, limit: AdaptiveBatchLimit) -> None:
        self.registry.register(BatchLimitCollector(self.model, limit))

    def job_counts(self) -> tuple[int, int]:
        """(jobs running now, jobs finished for good since start), for the heartbeat."""
        with self._lock:
            return self._running, self._done

    def batch_done(self, run: BatchRun) -> None:
        self.batch_size.labels(self.model).observe(len(run.job_ids))
        self.batch_seconds.labels(self.model).observe(run.seconds)

    def job_started(self, task) -> None:
        self.in_flight.labels(self.model).inc()
        with self._lock:
            self._running += 1

    def job_succeeded(self, task, result: ForecastResult) -> None:
        self._finished(final=True)
        self.jobs.labels(self.model, "succeeded", "").inc()
        timings = result.timings
        for phase in PHASES:
            seconds = getattr(timings, phase)
            if seconds is not None:  # queue_wait is unknown for jobs sent without the sent-at header
                self.job_seconds.labels(self.model, phase).observe(seconds)
        self.generated_steps.labels(self.model).inc(len(result.timestamps) * result.sample_count)

    def job_not_run(self, task, reason: str) -> None:
        self.jobs_not_run.labels(self.model, reason).inc()

    def job_taken_over(self, task, runs: int) -> None:
        self.takeovers.labels(self.model).inc()

    def job_failed(self, task, payload, error: JobError, will_retry: bool) -> None:
        self._finished(final=not will_retry)
        if will_retry:
            self.retries.labels(self.model, error.code).inc()
        else:
            self.jobs.labels(self.model, "failed", error.code).inc()

    def _finished(self, final: bool) -> None:
        self.in_flight.labels(self.model).dec()
        with self._lock:
            self._running -= 1
            if final:
                self._done += 1


class BatchLimitCollector:
    """The adaptive batch limit (worker/memory.py) and its out-of-memory count, read at scrape time."""

    def __init__(self, model: str, limit: AdaptiveBatchLimit):
        self.model = model
        self.limit = limit

    def describe(self):
        return self._families()

    def collect(self):
        limit, out_of_memory = self._families()
        limit.add_metric([self.model], self.limit.current)
        out_of_memory.add_metric([self.model], self.limit.out_of_memory_count)
        return [limit, out_of_memory]

    @staticmethod
    def _families() -> list:
        return [
            GaugeMetricFamily(
                "kronos_batch_limit",
                "Largest batch gathered now: KRONOS_MAX_BATCH_SIZE, halved after out-of-memory, grown back.",
                labels=["model"],
            ),
            CounterMetricFamily("kronos_oom", "Engine calls that ran out of memory.", labels=["model"]),
        ]


class QueueDepthCollector:
    """`kronos_queue_depth{queue}` read from Redis at scrape time: jobs waiting, over every priority step.

    kombu keeps one Redis list per priority step: `<queue>` for step 0 and `<queue>\\x06\\x16<p>` for the
    others, so a plain LLEN of the queue's name misses every job sent with a priority (the router's default
    is 5). Jobs a worker has fetched but not acknowledged are not in these lists. Beside it, `kronos_delayed_jobs`:
    jobs whose eta is still ahead, waiting in Redis's delayed set (worker/delayed.py), every queue's together.
    """

    def __init__(self, client: redis.Redis, queues: Sequence[str], priority_steps: Sequence[int]):
        self.client = client
        self.queues = list(queues)
        self.priority_steps = list(priority_steps)

    def describe(self):
        yield GaugeMetricFamily("kronos_queue_depth", self._help(), labels=["queue"])
        yield GaugeMetricFamily("kronos_delayed_jobs", DELAYED_HELP)

    def collect(self):
        keys = [[queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in self.priority_steps]
                for queue in self.queues]  # fmt: skip
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in (key for queue_keys in keys for key in queue_keys):
                    pipe.llen(key)
                pipe.zcard(DELAYED_KEY)
                *depths, delayed = pipe.execute()
                lengths = iter(depths)
        except redis.RedisError as exc:
            # No sample rather than a failed scrape: the other metrics of this process are still good.
            log.warning("queue depth not read: %r", exc)
            return
        family = GaugeMetricFamily("kronos_queue_depth", self._help(), labels=["queue"])
        for queue, queue_keys in zip(self.queues, keys, strict=True):
            family.add_metric([queue], sum(next(lengths) for _ in queue_keys))
        yield family
        yield GaugeMetricFamily("kronos_delayed_jobs", DELAYED_HELP, value=delayed)

    @staticmethod
    def _help() -> str:
        return "Jobs waiting in the queue (all priority steps), read from Redis at scrape time."


class GpuMemoryCollector:
    """CUDA memory of this process's device; registered only when the model runs on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def describe(self):
        return self._families()

    def collect(self):
        index = self.device.index or 0
        values = (
            torch.cuda.memory_allocated(index),
            torch.cuda.memory_reserved(index),
            torch.cuda.get_device_properties(index).total_memory,
        )
        families = self._families()
        for family, value in zip(families, values, strict=True):
            family.add_metric([str(self.device)], value)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("kronos_gpu_memory_allocated_bytes", "GPU memory held by tensors.", labels=["device"]),
            GaugeMetricFamily(
                "kronos_gpu_memory_reserved_bytes",
                "GPU memory reserved by PyTorch's caching allocator (what other processes cannot use).",
                labels=["device"],
            ),
            GaugeMetricFamily("kronos_gpu_memory_total_bytes", "The device's memory.", labels=["device"]),
        ]


class ProcessMemoryCollector:
    """Peak RSS, which process_resident_memory_bytes (the current RSS) misses between scrapes, and the
    memory limit of this process's cgroup (absent when there is none), for a memory-near-limit alert."""

    def describe(self):
        return [self._peak(), self._limit()]

    def collect(self):
        peak = self._peak()
        peak.add_metric([], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
        yield peak
        limit = cgroup_memory_limit()
        if limit is not None:
            family = self._limit()
            family.add_metric([], limit)
            yield family

    @staticmethod
    def _peak() -> GaugeMetricFamily:
        return GaugeMetricFamily("kronos_process_peak_rss_bytes", "Largest resident memory since start.")

    @staticmethod
    def _limit() -> GaugeMetricFamily:
        return GaugeMetricFamily("kronos_memory_limit_bytes", "Memory limit of this process's cgroup.")


def cgroup_memory_limit() -> int | None:
    """The container's memory limit (cgroup v2, else v1), or None when it has none."""
    for path in _CGROUP_LIMIT_FILES:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= _UNLIMITED:
            return None
        return int(raw)
    return None


Probe = Callable[[], str | None]  # None when healthy, else why not


def serve(
    registry: CollectorRegistry, address: str, port: int, probes: Mapping[str, Probe]
) -> ThreadingHTTPServer | None:
    """Serve `/metrics` and the probes (path -> check: 200 "ok", or 503 with the reason) from a daemon thread.

    prometheus_client's own start_http_server serves only metrics; the probes belong on the same port so
    that a container needs one port for both. None when the port cannot be bound: that is logged, and the
    worker goes on serving jobs (Prometheus reports the target down).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # the name http.server dispatches GET to
            path = urlsplit(self.path).path
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(registry), content_type)
            elif path in probes:
                reason = probes[path]()
                status, text = (200, "ok") if reason is None else (503, reason)
                self._reply(status, f"{text}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found\n", "text/plain; charset=utf-8")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # every scrape would otherwise be a line on stderr
            log.debug("metrics endpoint: " + format, *args)

    try:
        server = ThreadingHTTPServer((address, port), Handler)
    except OSError as exc:
        log.error("no /metrics and no probes: cannot listen on %s:%d: %s", address, port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kronos-metrics", daemon=True).start()
    return server
