"""One listener per group of idle workers, the rest waiting for a token (worker/wakeup.py), as the pop script
(worker/transport.py) decides it: run here on a real redis-server, one script call at a time, as channels with
different ids send it. The workers themselves: tests/integration/test_idle_workers.py."""

import json
import time

import pytest
from redis_server import RedisServer

from tasks.keys import DELAYED_KEY
from worker import wakeup
from worker.transport import MAX_POISON, POISON_KEY, POP_AND_RECORD

QUEUE = "kronos.kronos-small"
LISTS = [QUEUE]
LEASE_KEY, WAKE_KEY = "kronos:listener:g", "kronos:wake:g"
LEASE_MS = int(wakeup.LISTENER_LEASE * 1000)


@pytest.fixture(scope="module")
def redis_client():
    with RedisServer() as server, server.client(0) as client:
        yield client


@pytest.fixture
def client(redis_client):
    redis_client.flushdb()
    return redis_client


def pop(client, channel_id: str, *, idle: bool = True) -> list:
    """One pop by the channel `channel_id`: the script's reply."""
    return client.eval(
        POP_AND_RECORD, len(LISTS), *LISTS, "unacked", "unacked_index", 1.0, POISON_KEY, MAX_POISON, 1 << 20,
        DELAYED_KEY, "", LEASE_KEY, WAKE_KEY, channel_id, LEASE_MS, "1" if idle else "0", *([QUEUE] * len(LISTS)),
    )  # fmt: skip


def push_job(client, tag: str) -> None:
    client.lpush(QUEUE, json.dumps({"body": "", "headers": {}, "properties": {"delivery_tag": tag}}))


def test_the_first_idle_channel_to_find_nothing_listens_and_the_next_waits(client):
    assert pop(client, "a")[3] == b"listen"
    assert pop(client, "b")[3] == b"wait"
    assert pop(client, "a")[3] == b"listen"  # renewed
    assert client.get(LEASE_KEY) == b"a"
    assert 0 < client.pttl(LEASE_KEY) <= LEASE_MS
    assert client.llen(WAKE_KEY) == 0  # nothing taken, no one to wake


def test_a_channel_with_jobs_in_flight_neither_listens_nor_waits(client):
    assert pop(client, "busy", idle=False)[3] is None
    assert not client.exists(LEASE_KEY)
    assert pop(client, "a")[3] == b"listen"


def test_an_expired_lease_goes_to_the_next_idle_channel(client):
    assert pop(client, "a")[3] == b"listen"
    client.pexpire(LEASE_KEY, 1)
    time.sleep(0.01)
    assert pop(client, "b")[3] == b"listen"
    assert pop(client, "a")[3] == b"wait"


def test_the_listener_taking_the_only_job_gives_up_its_lease_and_wakes_one_waiter(client):
    assert pop(client, "a")[3] == b"listen"
    push_job(client, "t1")
    key, _, tag = pop(client, "a")
    assert (key, tag) == (QUEUE.encode(), b"t1")
    assert not client.exists(LEASE_KEY)
    assert client.lrange(WAKE_KEY, 0, -1) == [b"1"]  # one waiter wakes, finds nothing, and listens
    assert 0 < client.pttl(WAKE_KEY) <= LEASE_MS
    assert pop(client, "b")[3] == b"listen"


def test_a_job_taken_with_more_queued_wakes_one_waiter_per_job_left(client):
    assert pop(client, "a")[3] == b"listen"
    for number in range(4):
        push_job(client, f"t{number}")
    pop(client, "a")
    assert client.llen(WAKE_KEY) == 3
    pop(client, "b")  # a woken waiter takes one: the two left already have their tokens
    assert client.llen(WAKE_KEY) == 3


def test_a_job_taken_while_another_channel_listens_with_nothing_left_wakes_no_one(client):
    assert pop(client, "a")[3] == b"listen"
    push_job(client, "t1")
    assert pop(client, "busy", idle=False)[2] == b"t1"
    assert client.get(LEASE_KEY) == b"a"
    assert client.llen(WAKE_KEY) == 0


def test_tokens_are_capped(client):
    for number in range(wakeup.MAX_TOKENS + 10):
        push_job(client, f"t{number}")
    pop(client, "a")
    assert client.llen(WAKE_KEY) == wakeup.MAX_TOKENS


def test_a_resigning_listener_hands_on_and_only_the_listener_can(client):
    assert pop(client, "a")[3] == b"listen"
    assert client.eval(wakeup.RESIGN, 2, LEASE_KEY, WAKE_KEY, "b", LEASE_MS) == 0
    assert client.get(LEASE_KEY) == b"a"
    assert client.eval(wakeup.RESIGN, 2, LEASE_KEY, WAKE_KEY, "a", LEASE_MS) == 1
    assert not client.exists(LEASE_KEY)
    assert client.lrange(WAKE_KEY, 0, -1) == [b"1"]


def test_a_channel_without_a_doorbell_has_no_group(client):
    reply = client.eval(
        POP_AND_RECORD, 1, QUEUE, "unacked", "unacked_index", 1.0, POISON_KEY, MAX_POISON, 1 << 20, DELAYED_KEY,
        "", "", "", "", "", "", QUEUE,
    )  # fmt: skip
    assert reply == [None, None, None, None]
    assert client.keys("kronos:*") == []
