"""The Batcher (worker/batching.py) with a stand-in engine call: batches up to the current limit, the wait
for a batch, the split of a failing batch (halves for out-of-memory, one by one otherwise) and the limit that
an out-of-memory error lowers and successes raise again (worker/memory.py)."""

import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from worker.batching import Batcher, DeadlinePassed, WorkItem
from worker.jobs import is_out_of_memory
from worker.memory import AdaptiveBatchLimit

RESULT_TIMEOUT = 10  # a future never resolved fails the test instead of hanging it


class Engine:
    """Records the payloads of every call; `fails(payloads)` returns the exception a call raises, or None."""

    def __init__(self, fails: Callable[[Sequence[str]], BaseException | None] = lambda payloads: None):
        self.fails = fails
        self.calls: list[list[str]] = []

    def __call__(self, payloads: Sequence[str], progress) -> list[str]:
        self.calls.append(list(payloads))
        error = self.fails(payloads)
        if error is not None:
            raise error
        return [f"forecast of {payload}" for payload in payloads]

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


def out_of_memory_above(size: int) -> Callable[[Sequence[str]], BaseException | None]:
    return lambda payloads: torch.OutOfMemoryError("CUDA out of memory") if len(payloads) > size else None


@pytest.fixture
def start() -> Iterator[Callable[..., Batcher]]:
    """Starts Batchers (max_wait 0.3 s unless given) and stops each one after the test, passed or failed."""
    started: list[Batcher] = []

    def start_batcher(engine: Engine, limit: AdaptiveBatchLimit, max_wait: float = 0.3) -> Batcher:
        batcher = Batcher(engine, batch_limit=limit, max_wait=max_wait, is_out_of_memory=is_out_of_memory)
        started.append(batcher)
        return batcher

    yield start_batcher
    for batcher in started:
        batcher.stop(timeout=RESULT_TIMEOUT)


def submit_all(batcher: Batcher, payloads: Sequence[str], **item_options) -> list:
    return [batcher.submit(WorkItem(payload, payload, steps=1, **item_options)) for payload in payloads]


def outputs(futures) -> list[str]:
    return [future.result(timeout=RESULT_TIMEOUT).output for future in futures]


def test_work_is_split_into_batches_of_at_most_the_limit(start):
    engine = Engine()
    batcher = start(engine, AdaptiveBatchLimit(maximum=4, grow_after=50))
    payloads = [f"s{i}" for i in range(10)]
    futures = submit_all(batcher, payloads)
    assert outputs(futures) == [f"forecast of {payload}" for payload in payloads]
    assert engine.sizes == [4, 4, 2]
    assert [call for batch in engine.calls for call in batch] == payloads  # in the order submitted
    assert [future.result().batch_size for future in futures] == [4] * 8 + [2] * 2


def test_a_lone_job_waits_for_company_at_most_max_wait(start):
    engine = Engine()
    batcher = start(engine, AdaptiveBatchLimit(maximum=8, grow_after=50), max_wait=0.2)
    [alone] = submit_all(batcher, ["alone"])
    outcome = alone.result(timeout=RESULT_TIMEOUT)
    assert outcome.batch_size == 1
    assert 0.15 <= outcome.batch_wait_seconds < 2.0
    # a job that comes after the window closed is the next batch, not a late member of this one
    [later] = submit_all(batcher, ["later"])
    assert later.result(timeout=RESULT_TIMEOUT).batch_size == 1
    assert engine.calls == [["alone"], ["later"]]


def test_out_of_memory_halves_the_batch_until_it_fits_and_lowers_the_limit(start):
    engine = Engine(out_of_memory_above(2))
    limit = AdaptiveBatchLimit(maximum=8, grow_after=50)
    batcher = start(engine, limit)
    futures = submit_all(batcher, [f"s{i}" for i in range(8)])
    assert outputs(futures) == [f"forecast of s{i}" for i in range(8)]
    assert engine.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert (limit.current, limit.out_of_memory_count) == (2, 3)  # at 8, and at 4 for each half
    assert {future.result().batch_size for future in futures} == {2}


def test_a_job_out_of_memory_even_alone_fails_and_only_it(start):
    engine = Engine(lambda payloads: torch.OutOfMemoryError("huge") if "huge" in payloads else None)
    batcher = start(engine, AdaptiveBatchLimit(maximum=4, grow_after=50))
    futures = submit_all(batcher, ["a", "huge", "b", "c"])
    with pytest.raises(torch.OutOfMemoryError):
        futures[1].result(timeout=RESULT_TIMEOUT)
    assert outputs([futures[0], futures[2], futures[3]]) == ["forecast of a", "forecast of b", "forecast of c"]
    assert engine.calls == [["a", "huge", "b", "c"], ["a", "huge"], ["a"], ["huge"], ["b", "c"]]


def test_any_other_error_reruns_the_batch_one_by_one_and_fails_only_the_culprit(start):
    engine = Engine(lambda payloads: ValueError("bad candles") if "bad" in payloads else None)
    limit = AdaptiveBatchLimit(maximum=4, grow_after=50)
    batcher = start(engine, limit)
    futures = submit_all(batcher, ["a", "b", "bad", "c"])
    with pytest.raises(ValueError, match="bad candles"):
        futures[2].result(timeout=RESULT_TIMEOUT)
    assert outputs([futures[0], futures[1], futures[3]]) == ["forecast of a", "forecast of b", "forecast of c"]
    assert engine.sizes == [4, 1, 1, 1, 1]
    assert (limit.current, limit.out_of_memory_count) == (4, 0)  # not a memory problem: the limit stays


def test_the_lowered_limit_gathers_smaller_batches_and_grows_back_after_its_successes(start):
    memory_is_short = True
    engine = Engine(lambda payloads: out_of_memory_above(4)(payloads) if memory_is_short else None)
    limit = AdaptiveBatchLimit(maximum=8, grow_after=3)
    batcher = start(engine, limit)
    outputs(submit_all(batcher, [f"a{i}" for i in range(8)]))
    assert engine.sizes == [8, 4, 4] and limit.current == 4  # two successes since: not yet grown back

    memory_is_short = False
    engine.calls.clear()
    outputs(submit_all(batcher, [f"b{i}" for i in range(8)]))
    # gathered at the lowered limit; the first of these is the third success, which doubles it again
    assert engine.sizes == [4, 4] and limit.current == 8
    engine.calls.clear()
    outputs(submit_all(batcher, [f"c{i}" for i in range(8)]))
    assert engine.sizes == [8]


def test_the_limit_grows_back_at_once_when_free_memory_recovered():
    free = [1_000]
    limit = AdaptiveBatchLimit(maximum=8, grow_after=50, free_memory=lambda: free[0])
    limit.out_of_memory(8)
    limit.batch_succeeded()
    assert limit.current == 4  # as little free memory as when it ran out
    free[0] = 1_500  # RECOVERED times as much
    limit.batch_succeeded()
    assert limit.current == 8


def test_a_job_whose_deadline_passed_while_it_waited_is_not_run(start):
    engine = Engine()
    batcher = start(engine, AdaptiveBatchLimit(maximum=4, grow_after=50))
    [late] = submit_all(batcher, ["late"], deadline=time.time() - 1)
    [on_time] = submit_all(batcher, ["on time"], deadline=time.time() + 60)
    with pytest.raises(DeadlinePassed):
        late.result(timeout=RESULT_TIMEOUT)
    assert outputs([on_time]) == ["forecast of on time"]
    assert engine.calls == [["on time"]]
