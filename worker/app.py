"""The worker process, wired in one place: `celery -A worker.app worker`.

One process serves one model on one device: it consumes only that model's queues (the shared one, or one per
producer: tasks/routing.py), loads the model once
before it takes any job (`celeryd_after_setup`), runs jobs in a threads pool whose threads feed one batching
thread, and releases the model at shutdown. A process that cannot load its model exits with status 3
and says why; it never consumes a job. `python -m worker.launch` starts one such process per GPU.
"""

import logging
import os
import sys
import time
from http.server import ThreadingHTTPServer

from celery import signals, states

from schemas import ErrorCode, JobFailed, Limits
from tasks.app import app
from tasks.routing import FORECAST_TASK, PRIORITY_STEPS, serving_queues
from tasks.settings import current_settings
from worker import control, faults, lifecycle, logs, transport
from worker.batching import Batcher, BatchRun
from worker.circuit import CircuitBreaker
from worker.claims import Claims, LeaseKeeper
from worker.deadletters import DeadLetterObserver
from worker.health import Heartbeat, Readiness, broker_client
from worker.jobs import JobRunner, fault_injector, is_out_of_memory, make_batch_runner, smoke_forecast
from worker.memory import AdaptiveBatchLimit, free_memory_of
from worker.metrics import WorkerMetrics, serve
from worker.quotas import ProducerQuotas
from worker.settings import current_worker_settings

log = logging.getLogger("kronos.worker")
EXIT_MODEL_NOT_LOADED = 3

settings = current_worker_settings()
# Jobs run in threads of this process, which owns the model and the batching thread; prefork children
# would each need their own copy of the weights and could not share batches.
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = settings.concurrency
# Survive junk pushed onto the queue, and answer undecodable jobs instead of dropping them silently.
app.conf.broker_transport = (
    "worker.transport:SentinelTransport" if current_settings().uses_sentinel else "worker.transport:Transport"
)
app.conf.worker_consumer = "worker.consumer:Consumer"
# Every state a worker stores goes through a compare-and-set that never replaces a final answer.
_backend = "SentinelResultBackend" if current_settings().uses_sentinel else "ResultBackend"
app.conf.result_backend = f"worker.results:{_backend}+{current_settings().result_backend}"
if settings.log_format == "json":
    signals.after_setup_logger.connect(logs.use_json_lines)
    signals.after_setup_task_logger.connect(logs.use_json_lines)


class _Runtime:
    """What the process holds while it serves: set by start_serving, cleared at worker_shutdown."""

    slot: lifecycle.ServingSlot | None = None
    batcher: Batcher | None = None
    circuit: CircuitBreaker | None = None
    jobs: JobRunner | None = None
    leases: LeaseKeeper | None = None
    heartbeat: Heartbeat | None = None
    http: ThreadingHTTPServer | None = None  # /metrics, /healthz, /readyz


runtime = _Runtime()


# throws: a JobFailed is an expected outcome (logged without a traceback), not a worker error.
# ignore_result: the job runner stores every state itself, after claiming the job (worker/jobs.py).
@app.task(name=FORECAST_TASK, bind=True, acks_late=True, throws=(JobFailed,), ignore_result=True)
def forecast(self, *args, **kwargs):
    """Forecast one series: args=[request] (or kwargs={"request": ...}), a schemas.ForecastRequest as JSON.

    Any other shape reaches validation as a non-object and fails there with INVALID_INPUT, instead of
    raising TypeError in Celery's call (which would look like a worker fault)."""
    if runtime.jobs is None:
        raise JobFailed.of(ErrorCode.MODEL_NOT_READY, "the worker has no model loaded", job_id=self.request.id)
    request = args[0] if len(args) == 1 and not kwargs else kwargs.get("request") if not args else None
    return runtime.jobs.run(self, request)


@signals.celeryd_after_setup.connect
def start_serving(sender, instance, **_):
    """Runs once logging is set up and before the consumer starts: nothing is fetched until this returns."""
    queues = serving_queues(settings.model)  # queue -> the producer whose jobs it holds
    instance.app.amqp.queues.select(list(queues))
    pool = getattr(instance, "pool_cls", None)
    if pool is not None and "thread" not in str(pool):
        log.critical("the Kronos worker needs the threads pool (-P threads), got %s", pool)
        sys.exit(EXIT_MODEL_NOT_LOADED)
    limits = Limits.from_env()
    if settings.test_faults:
        log.warning("KRONOS_TEST_FAULTS=1: fault injection is ON; never set it in production")
        signals.task_success.connect(lambda sender, result, **_: faults.exit_after_result(sender, result), weak=False)
    # Heartbeat and probes start first, so that a long model download shows as "not ready", not as absent.
    broker = broker_client(current_settings())
    metrics, job_log, readiness = WorkerMetrics(settings.model, list(queues)), logs.JobLog(), Readiness()
    metrics.watch_readiness(lambda: readiness.reason() is None)
    metrics.watch_queue_depth(broker, PRIORITY_STEPS)
    transport.on_refused = _answer_refusals(metrics)
    runtime.heartbeat = Heartbeat(
        broker, worker=sender, queues=list(queues), model=settings.model, interval=settings.heartbeat_interval,
        readiness=readiness, job_counts=metrics.job_counts,
    )  # fmt: skip
    runtime.heartbeat.start()
    if settings.metrics_port:
        probes = {"/healthz": lambda: None, "/readyz": readiness.reason}
        runtime.http = serve(metrics.registry, settings.metrics_address, settings.metrics_port, probes)
    try:
        serving = lifecycle.load(settings, max_pred_len=limits.max_pred_len)
    except Exception as exc:
        log.critical("cannot load model %s (%s): %s; not consuming any job", settings.model, settings.predictor, exc)
        runtime.heartbeat.stop()
        sys.exit(EXIT_MODEL_NOT_LOADED)
    info = serving.engine.info
    log.info(
        "serving %s from %s; model loaded: %s rev %s, tokenizer %s rev %s, device %s, %.2f s, pid %d",
        settings.model, ", ".join(queues), info.predictor, info.predictor_revision, info.tokenizer,
        info.tokenizer_revision, serving.device, serving.load_seconds, os.getpid(),
    )  # fmt: skip
    metrics.record_model(info.predictor, info.predictor_revision, serving.engine.device, serving.load_seconds)
    runtime.heartbeat.model_loaded(serving)

    def on_batch(run: BatchRun) -> None:
        metrics.batch_done(run)
        job_log.batch_done(run)

    slot = lifecycle.ServingSlot(serving)
    batch_limit = AdaptiveBatchLimit(
        settings.max_batch_size, grow_after=settings.batch_grow_after, free_memory=free_memory_of(serving.engine.device)
    )
    metrics.watch_batch_limit(batch_limit)
    batcher = Batcher(
        make_batch_runner(slot, fault_injector(broker, settings.test_fault_key) if settings.test_faults else None),
        batch_limit=batch_limit,
        max_wait=settings.max_batch_wait,
        is_out_of_memory=is_out_of_memory,
        on_batch=on_batch,
    )
    circuit = _circuit_breaker(sender, list(queues), slot, batcher, readiness, metrics)
    runtime.slot, runtime.batcher, runtime.circuit = slot, batcher, circuit
    shared = current_settings()
    results = app.backend
    claims = Claims(results.client, settings.claim_lease, expires_seconds=shared.result_expires)
    runtime.leases = LeaseKeeper(claims, settings.claim_lease)
    runtime.leases.start()
    runtime.jobs = JobRunner(
        slot,
        batcher,
        settings,
        limits,
        max_job_seconds=shared.max_job_seconds,
        results=results,
        claims=claims,
        leases=runtime.leases,
        visibility_timeout=shared.visibility_timeout,
        observers=[DeadLetterObserver(broker), metrics, job_log, circuit],
        refusal=circuit.refusal,
        quotas=ProducerQuotas(broker, settings.quotas, reservation_ttl=current_settings().visibility_timeout),
        producer_of=lambda task: queues.get((task.request.delivery_info or {}).get("routing_key")),
    )
    control.serve(_model_updater(slot, limits, metrics))


def _answer_refusals(metrics: WorkerMetrics):
    """Count every refused item, and answer one that names a job of its producer's own with INVALID_INPUT,
    so that the producer learns why (the answer cannot replace a final one: worker/results.py)."""

    def on_refused(queue: str, reason: str, job_id: str | None) -> None:
        metrics.message_refused(queue, reason)
        if job_id is None:
            return
        failure = JobFailed.of(ErrorCode.INVALID_INPUT, f"message: refused ({reason})", field="message", job_id=job_id)
        try:  # one attempt: this runs in the consumer's event loop, which must not wait
            app.backend.store_result(job_id, failure, states.FAILURE, deadline=time.monotonic())
        except Exception as exc:
            log.warning("job %s: the refusal was not stored as its answer (%r)", job_id, exc)

    return on_refused


def _circuit_breaker(worker, queues, slot, batcher, readiness, metrics) -> CircuitBreaker:
    """Opens on consecutive internal failures: this worker leaves its queues to the others until a probe passes."""

    def consume(command):
        def switch() -> None:
            for queue in queues:
                command(queue, destination=[worker], reply=True, timeout=10)

        return switch

    def on_change(reason: str | None) -> None:
        readiness.circuit_open = reason
        runtime.heartbeat.beat()

    circuit = CircuitBreaker(
        threshold=settings.circuit_failures,
        cooldown=settings.circuit_cooldown,
        stop_consuming=consume(app.control.cancel_consumer),
        resume_consuming=consume(app.control.add_consumer),
        probe=lambda: smoke_forecast(slot, batcher, timeout=current_settings().max_job_seconds),
        on_change=on_change,
    )
    metrics.watch_circuit(lambda: circuit.refusal() is not None)
    return circuit


def _model_updater(slot, limits, metrics) -> control.ModelUpdater:
    """Rolling updates (kronos_load_model): metrics and the heartbeat follow the engine actually served."""

    def on_switched(_previous: lifecycle.ServingModel, serving: lifecycle.ServingModel) -> None:
        info = serving.engine.info
        metrics.model_switched(info.predictor, info.predictor_revision)
        runtime.heartbeat.model_loaded(serving)

    def on_state(update: dict) -> None:
        if update["state"] != "loading":
            metrics.model_update_finished(update["state"])
        runtime.heartbeat.report("model_update", update)

    return control.ModelUpdater(slot, settings, limits.max_pred_len, on_switched, on_state)


@signals.worker_ready.connect
def report_consuming(**_):
    if runtime.heartbeat is not None:
        runtime.heartbeat.consumer_started()


@signals.worker_shutting_down.connect
def report_shutting_down(**_):
    if runtime.heartbeat is not None:
        runtime.heartbeat.shutting_down()


@signals.worker_shutdown.connect
def release_model(**_):
    control.serve(None)
    if runtime.circuit is not None:
        runtime.circuit.stop()
    if runtime.heartbeat is not None:
        runtime.heartbeat.stop()
    if runtime.http is not None:
        runtime.http.shutdown()
    if runtime.batcher is not None:
        runtime.batcher.stop(timeout=30)
    if runtime.leases is not None:
        runtime.leases.stop()
    if runtime.slot is not None:
        lifecycle.release(runtime.slot.current)
    runtime.slot = runtime.batcher = runtime.circuit = runtime.jobs = runtime.leases = None
    runtime.heartbeat = runtime.http = None
    log.info("model released")
