"""Dynamic batching: jobs that arrive close together run as one engine call.

Celery runs each job in its own pool thread (`-P threads`); each thread hands its prepared series to the
Batcher and blocks on a Future. One batching thread collects items until `max_batch_size` are waiting or
`max_wait` has passed since the first one (Ray Serve's and Triton's rule), runs them in one call, and
resolves every Future on its own. So each job keeps its own acknowledgement, result, error and retry in
Celery, and shares only the arithmetic.

One bad job must not fail its batch: when a batch call raises, the batch is split and re-run (halves
for out-of-memory, which a smaller batch may cure; one by one for anything else, to find the culprit),
so only the job that fails on its own gets the error. An out-of-memory error also lowers the largest batch
gathered from then on (worker/memory.py), which grows back after a run of successful batches.
celery-batches was the other candidate; it pins
Celery < 5.7 and acknowledges a whole batch even when it raised.
"""

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from worker.memory import AdaptiveBatchLimit

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
# runs a batch: (payloads, progress(steps_done, steps_total)) -> one output per payload, in order
RunBatch = Callable[[Sequence[Any], ProgressFn], Sequence[Any]]


@dataclass
class WorkItem:
    payload: Any
    job_id: str
    steps: int  # this job's horizon, to turn batch progress into its own
    deadline: float | None = None  # time.time() after which it must not start
    on_progress: ProgressFn | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchOutcome:
    output: Any
    batch_size: int
    inference_seconds: float
    batch_wait_seconds: float


@dataclass(frozen=True)
class BatchRun:
    """One successful engine call, as the on_batch hook (metrics, job logs) sees it."""

    batch_id: int  # numbers this Batcher's successful engine calls from 1, so log lines can name a batch
    job_ids: tuple[str, ...]
    seconds: float


class DeadlinePassed(Exception):
    """The item's deadline passed while it waited for a batch."""


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        batch_limit: AdaptiveBatchLimit,
        max_wait: float,
        is_out_of_memory: Callable[[BaseException], bool] = lambda exc: False,
        on_batch: Callable[[BatchRun], None] | None = None,
    ):
        self.run_batch = run_batch
        self.batch_limit = batch_limit
        self.max_wait = max_wait
        self.is_out_of_memory = is_out_of_memory
        self.on_batch = on_batch  # after every successful engine call, before its jobs get their results
        self._batch_ids = itertools.count(1)
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="kronos-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: WorkItem) -> Future:
        self._queue.put(item)
        return item.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the batching thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            try:
                self._run(batch)
            except Exception as exc:  # never let the batching thread die with jobs waiting on it
                log.exception("batch failed outside the engine call")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            if stop:
                return

    def _collect(self, first: WorkItem) -> tuple[list[WorkItem], bool]:
        batch = [first]
        until = time.monotonic() + self.max_wait
        while len(batch) < self.batch_limit.current:
            try:
                item = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch: list[WorkItem]) -> None:
        now = time.time()
        live = []
        for item in batch:
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlinePassed(f"deadline passed {now - item.deadline:.3f} s ago"))
            else:
                live.append(item)
        if live:
            self._run_live(live)

    def _run_live(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        try:
            outputs = self.run_batch([item.payload for item in batch], self._progress_fanout(batch))
        except Exception as exc:
            out_of_memory = self.is_out_of_memory(exc)
            if out_of_memory:
                self.batch_limit.out_of_memory(len(batch))
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            if out_of_memory:
                half = len(batch) // 2
                log.warning("out of memory at batch size %d; retrying as %d + %d", len(batch), half, len(batch) - half)
                parts = [batch[:half], batch[half:]]
            else:
                log.warning("batch of %d failed (%r); running its jobs one by one", len(batch), exc)
                parts = [[item] for item in batch]
            for part in parts:
                self._run_live(part)
            return
        seconds = time.monotonic() - started
        self.batch_limit.batch_succeeded()
        if self.on_batch is not None:
            run = BatchRun(next(self._batch_ids), tuple(item.job_id for item in batch), seconds)
            try:
                self.on_batch(run)
            except Exception:  # a metrics or logging bug must not fail the jobs of a batch that worked
                log.exception("on_batch hook failed")
        for item, output in zip(batch, outputs, strict=True):
            item.future.set_result(BatchOutcome(output, len(batch), seconds, started - item.submitted))

    @staticmethod
    def _progress_fanout(batch: list[WorkItem]) -> ProgressFn:
        def report(done: int, _total: int) -> None:
            for item in batch:
                if item.on_progress is not None and done <= item.steps:
                    item.on_progress(done, item.steps)

        return report
