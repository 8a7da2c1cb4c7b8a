"""Memory pressure: the batcher's largest batch adapts to what the device can hold.

An out-of-memory error at batch size N halves the limit (to N // 2, at least 1); the batch itself is split
and retried by the Batcher. Memory that ran out once may run out again at that size, so later batches
gather no more than the lowered limit. The pressure may have been passing (another process's allocation,
an unusually long series), so the limit doubles again, up to the configured maximum, after `grow_after`
successful batches at the lowered limit, or sooner, at the next successful batch after the device's free
memory has recovered to RECOVERED times what it was when memory ran out (free GPU memory from
torch.cuda.mem_get_info, or MemAvailable of the host for a CPU worker).
"""

import logging
import threading
from collections.abc import Callable

import torch

RECOVERED = 1.5

log = logging.getLogger(__name__)


class AdaptiveBatchLimit:
    """The batcher's current largest batch, with its out-of-memory count (both exported as metrics)."""

    def __init__(self, maximum: int, grow_after: int, free_memory: Callable[[], int | None] = lambda: None):
        self.maximum = maximum
        self.grow_after = grow_after
        self.free_memory = free_memory
        self._current = maximum
        self._successes = 0
        self._out_of_memory = 0
        self._free_at_out_of_memory: int | None = None
        self._lock = threading.Lock()  # the batcher thread updates, the metrics endpoint reads

    @property
    def current(self) -> int:
        return self._current

    @property
    def out_of_memory_count(self) -> int:
        return self._out_of_memory

    def out_of_memory(self, batch_size: int) -> None:
        free = self.free_memory()
        with self._lock:
            self._out_of_memory += 1
            self._successes = 0
            self._free_at_out_of_memory = free
            lowered = max(1, min(self._current, batch_size // 2))
            if lowered == self._current:
                return
            self._current = lowered
        log.warning("out of memory at batch size %d: batch limit lowered to %d", batch_size, lowered)

    def batch_succeeded(self) -> None:
        if self._current >= self.maximum:
            return
        free = self.free_memory()
        with self._lock:
            self._successes += 1
            before = self._free_at_out_of_memory
            recovered = free is not None and before is not None and free >= RECOVERED * before
            if self._successes < self.grow_after and not recovered:
                return
            self._successes = 0
            if recovered:
                self._free_at_out_of_memory = free
            self._current = min(self.maximum, self._current * 2)
            raised = self._current
        why = "free memory recovered" if recovered else f"{self.grow_after} successful batches"
        log.info("batch limit raised to %d: %s", raised, why)


def free_memory_of(device: torch.device) -> Callable[[], int | None]:
    """Bytes the device can still give: free GPU memory, or the host's MemAvailable for a CPU worker."""
    if device.type == "cuda":
        return lambda: torch.cuda.mem_get_info(device)[0]

    def host_available() -> int | None:
        try:
            with open("/proc/meminfo") as meminfo:
                return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None

    return host_available
