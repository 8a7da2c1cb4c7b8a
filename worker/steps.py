"""The worker's parts as Celery bootsteps: Celery's blueprint starts them in order before its consumer (which
starts last), so no job is fetched before the model is loaded, and stops them in reverse at shutdown.

- Probes: heartbeat, metrics, /healthz and /readyz. Up first, so that a long model load shows as "not ready"
  rather than as a missing worker.
- Serving: the model, the batching thread, the circuit breaker, claims and their leases, the job runner the
  forecast task calls (ForecastTask.runner), rolling model updates, and the answers to refused messages. A
  model that cannot load stops the worker with status 3 before it consumes anything.

Each part keeps what it made on the worker (`w.kronos_*`), the place Celery gives steps to share state.
"""

import logging
import os
import sys
import time

from celery import bootsteps, signals, states

from schemas import ErrorCode, JobFailed
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


class Probes(bootsteps.StartStopStep):
    """What shows the worker from outside: its heartbeat in Redis, its metrics and its probes."""

    label = "kronos probes"

    def create(self, w):
        settings = current_worker_settings()
        w.kronos_queues = serving_queues(settings.model)  # queue -> the producer whose jobs it holds
        w.app.amqp.queues.select(list(w.kronos_queues))
        pool = getattr(w, "pool_cls", None)
        if pool is not None and "thread" not in str(pool):
            log.critical("the Kronos worker needs the threads pool (-P threads), got %s", pool)
            sys.exit(EXIT_MODEL_NOT_LOADED)
        w.kronos_broker = broker_client(current_settings())
        w.kronos_metrics = WorkerMetrics(settings.model, list(w.kronos_queues))
        w.kronos_readiness = Readiness()
        w.kronos_metrics.watch_readiness(lambda: w.kronos_readiness.reason() is None)
        w.kronos_metrics.watch_queue_depth(w.kronos_broker, PRIORITY_STEPS)
        w.kronos_heartbeat = Heartbeat(
            w.kronos_broker, worker=w.hostname, queues=list(w.kronos_queues), model=settings.model,
            interval=settings.heartbeat_interval, readiness=w.kronos_readiness,
            job_counts=w.kronos_metrics.job_counts,
        )  # fmt: skip
        self.http = None
        # what the consumer reports: it started (the last step), and the worker's shutdown began
        signals.worker_ready.connect(self._consuming, weak=False)
        signals.worker_shutting_down.connect(self._shutting_down, weak=False)
        self.heartbeat = w.kronos_heartbeat

    def start(self, w):
        settings = current_worker_settings()
        self.heartbeat.start()
        if settings.metrics_port:
            probes = {"/healthz": lambda: None, "/readyz": w.kronos_readiness.reason}
            self.http = serve(w.kronos_metrics.registry, settings.metrics_address, settings.metrics_port, probes)

    def stop(self, w):
        self.heartbeat.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http = None

    terminate = stop

    def _consuming(self, **_):
        self.heartbeat.consumer_started()

    def _shutting_down(self, **_):
        self.heartbeat.shutting_down()


class Serving(bootsteps.StartStopStep):
    """The model and everything a job runs through, from load to release."""

    label = "kronos serving"
    # After the pool, so that it stops before the pool does (the blueprint stops in reverse): stop() drains
    # the pool's running jobs itself while the model is still there (warm shutdown).
    requires = (Probes, "celery.worker.components:Pool")

    def create(self, w):
        self.settings = current_worker_settings()
        self.limits = current_settings().limits
        self.task = w.app.tasks[FORECAST_TASK]
        self.slot = self.batcher = self.circuit = self.leases = None
        self.job_log = logs.JobLog()
        if self.settings.test_faults:
            log.warning("KRONOS_TEST_FAULTS=1: fault injection is ON; never set it in production")
            signals.task_success.connect(lambda sender, result, **_: faults.exit_after_result(sender, result),
                                         weak=False)  # fmt: skip

    def start(self, w):
        settings, shared = self.settings, current_settings()
        metrics, heartbeat, broker, queues = w.kronos_metrics, w.kronos_heartbeat, w.kronos_broker, w.kronos_queues
        try:
            serving = lifecycle.load(settings, max_pred_len=self.limits.max_pred_len)
        except Exception as exc:
            log.critical(
                "cannot load model %s (%s): %s; not consuming any job", settings.model, settings.predictor, exc
            )
            sys.exit(EXIT_MODEL_NOT_LOADED)
        info = serving.engine.info
        log.info(
            "serving %s from %s; model loaded: %s rev %s, tokenizer %s rev %s, device %s, %.2f s, pid %d",
            settings.model, ", ".join(queues), info.predictor, info.predictor_revision, info.tokenizer,
            info.tokenizer_revision, serving.device, serving.load_seconds, os.getpid(),
        )  # fmt: skip
        metrics.record_model(info.predictor, info.predictor_revision, serving.engine.device, serving.load_seconds)
        heartbeat.model_loaded(serving)
        self.slot = lifecycle.ServingSlot(serving)
        batch_limit = AdaptiveBatchLimit(settings.max_batch_size, grow_after=settings.batch_grow_after,
                                         free_memory=free_memory_of(serving.engine.device))  # fmt: skip
        metrics.watch_batch_limit(batch_limit)
        faulty = fault_injector(broker, settings.test_fault_key) if settings.test_faults else None
        self.batcher = Batcher(make_batch_runner(self.slot, faulty), batch_limit=batch_limit,
                               max_wait=settings.max_batch_wait, is_out_of_memory=is_out_of_memory,
                               on_batch=self._batch_done(metrics))  # fmt: skip
        self.circuit = self._circuit_breaker(w)
        results = w.app.backend
        claims = Claims(results.client, settings.claim_lease, expires_seconds=shared.result_expires)
        self.leases = LeaseKeeper(claims, settings.claim_lease)
        self.leases.start()
        self.task.runner = JobRunner(
            self.slot,
            self.batcher,
            settings,
            self.limits,
            max_job_seconds=shared.max_job_seconds,
            results=results,
            claims=claims,
            leases=self.leases,
            visibility_timeout=shared.visibility_timeout,
            observers=[DeadLetterObserver(broker), metrics, self.job_log, self.circuit],
            refusal=self.circuit.refusal,
            quotas=ProducerQuotas(broker, settings.quotas, reservation_ttl=shared.visibility_timeout),
            producer_of=lambda task: queues.get((task.request.delivery_info or {}).get("routing_key")),
        )
        self.answer_refusals = self._answer_refusals(w)
        transport.message_refused.connect(self.answer_refusals, weak=False)
        control.serve(self._model_updater(w))

    def stop(self, w):
        """Warm shutdown: the consumer has stopped fetching; the jobs in hand finish on the model, then it goes."""
        w.pool.stop()  # waits for the running jobs; the pool's own step stops it again, which does nothing
        self.terminate(w)

    def terminate(self, w):
        """Cold shutdown (and the end of a warm one): no waiting for jobs."""
        control.serve(None)
        if self.slot is None:  # the model never loaded: nothing else was started
            return
        transport.message_refused.disconnect(self.answer_refusals)
        self.circuit.stop()
        self.batcher.stop(timeout=30)
        self.leases.stop()
        self.task.runner = None
        lifecycle.release(self.slot.current)
        self.slot = None
        log.info("model released")

    def _batch_done(self, metrics):
        def on_batch(run: BatchRun) -> None:
            metrics.batch_done(run)
            self.job_log.batch_done(run)

        return on_batch

    def _answer_refusals(self, w):
        """Count every refused item, and answer one that names a job of its producer's own with INVALID_INPUT,
        so that the producer learns why (the answer cannot replace a final one: worker/results.py)."""

        def on_refused(sender, queue: str, reason: str, job_id: str | None, **_) -> None:
            w.kronos_metrics.message_refused(queue, reason)
            if job_id is None:
                return
            failure = JobFailed.of(ErrorCode.INVALID_INPUT, f"message: refused ({reason})", field="message",
                                   job_id=job_id)  # fmt: skip
            try:  # one attempt: this runs in the consumer's event loop, which must not wait
                w.app.backend.store_result(job_id, failure, states.FAILURE, deadline=time.monotonic())
            except Exception as exc:
                log.warning("job %s: the refusal was not stored as its answer (%r)", job_id, exc)

        return on_refused

    def _circuit_breaker(self, w) -> CircuitBreaker:
        """Opens on consecutive internal failures: this worker leaves its queues to the others until a probe
        passes."""

        def consume(command):
            def switch() -> None:
                for queue in w.kronos_queues:
                    command(queue, destination=[w.hostname], reply=True, timeout=10)

            return switch

        def on_change(reason: str | None) -> None:
            w.kronos_readiness.circuit_open = reason
            w.kronos_heartbeat.beat()

        circuit = CircuitBreaker(
            threshold=self.settings.circuit_failures,
            cooldown=self.settings.circuit_cooldown,
            stop_consuming=consume(w.app.control.cancel_consumer),
            resume_consuming=consume(w.app.control.add_consumer),
            probe=lambda: smoke_forecast(self.slot, self.batcher, timeout=current_settings().max_job_seconds),
            on_change=on_change,
        )
        w.kronos_metrics.watch_circuit(lambda: circuit.refusal() is not None)
        return circuit

    def _model_updater(self, w) -> control.ModelUpdater:
        """Rolling updates (kronos_load_model): metrics and the heartbeat follow the engine actually served."""

        def on_switched(_previous: lifecycle.ServingModel, serving: lifecycle.ServingModel) -> None:
            info = serving.engine.info
            w.kronos_metrics.model_switched(info.predictor, info.predictor_revision)
            w.kronos_heartbeat.model_loaded(serving)

        def on_state(update: dict) -> None:
            if update["state"] != "loading":
                w.kronos_metrics.model_update_finished(update["state"])
            w.kronos_heartbeat.report("model_update", update)

        return control.ModelUpdater(self.slot, self.settings, self.limits.max_pred_len, on_switched, on_state)
