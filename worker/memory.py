"""Memory pressure: the batcher's largest batch adapts to what the device can hold.

An out-of-memory error at batch size N halves the limit (to N // 2, at least 1); the batch itself is split
and retried by the Batcher. Memory that ran out once may run out again at that size, so later batches
gather no more than the lowered limit. The pressure may have been passing (another process's allocation,
an unusually long series), so after `grow_after` successful batches at the lowered limit it doubles again,
up to the configured maximum: each step back up is tried only after a run of evidence that the current
size fits.
"""

import logging
import threading

log = logging.getLogger(__name__)


class AdaptiveBatchLimit:
    """The batcher's current largest batch, with its out-of-memory count (both exported as metrics)."""

    def __init__(self, maximum: int, grow_after: int):
        self.maximum = maximum
        self.grow_after = grow_after
        self._current = maximum
        self._successes = 0
        self._out_of_memory = 0
        self._lock = threading.Lock()  # the batcher thread updates, the metrics endpoint reads

    @property
    def current(self) -> int:
        return self._current

    @property
    def out_of_memory_count(self) -> int:
        return self._out_of_memory

    def out_of_memory(self, batch_size: int) -> None:
        with self._lock:
            self._out_of_memory += 1
            self._successes = 0
            lowered = max(1, min(self._current, batch_size // 2))
            if lowered == self._current:
                return
            self._current = lowered
        log.warning("out of memory at batch size %d: batch limit lowered to %d", batch_size, lowered)

    def batch_succeeded(self) -> None:
        with self._lock:
            if self._current >= self.maximum:
                return
            self._successes += 1
            if self._successes < self.grow_after:
                return
            self._successes = 0
            self._current = min(self.maximum, self._current * 2)
            raised = self._current
        log.info("batch limit raised to %d after %d successful batches", raised, self.grow_after)
