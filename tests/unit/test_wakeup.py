"""The Doorbell's decisions (worker/wakeup.py), in-process: when an idle channel pops again, waits for a ring or
polls, and when a ring is due. A scripted stand-in for redis-py's PubSub and for Celery's event loop; the real
thing, with redis-server and workers, is tests/integration/test_idle_workers.py."""

import redis

from tasks.keys import keyspace_channel
from worker import wakeup
from worker.wakeup import POLL, POP_AGAIN, WAIT_FOR_RING, Doorbell

QUEUE = "kronos.kronos-small"
CHANNEL = keyspace_channel(0, QUEUE)


class ScriptedPubSub:
    def __init__(self):
        self.messages: list[dict] = []
        self.subscribed: set[str] = set()
        self.fail_next_read = False

        class Socket:
            def fileno(self):
                return 42

        self.connection = type("Connection", (), {"_sock": Socket()})()

    def subscribe(self, *channels):
        self.subscribed.update(channels)

    def unsubscribe(self, *channels):
        self.subscribed.difference_update(channels)

    def get_message(self, timeout=0.0):
        if self.fail_next_read:
            raise redis.ConnectionError("connection closed by the server")
        return self.messages.pop(0) if self.messages else None

    def announce(self, channel: str, event: str) -> None:
        self.messages.append({"type": "message", "channel": channel.encode(), "data": event.encode()})

    def close(self):
        self.subscribed.clear()


class EventLoop:
    def __init__(self):
        self.readers: dict[int, object] = {}
        self.timers: list[tuple[float, object]] = []

    def add_reader(self, fd, callback):
        self.readers[fd] = callback

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def call_later(self, seconds, callback):
        self.timers.append((seconds, callback))

    def readable(self):
        for callback in list(self.readers.values()):
            callback()

    def run_timers(self):
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


def doorbell() -> tuple[Doorbell, ScriptedPubSub, EventLoop, list[int]]:
    pubsub, loop, rings = ScriptedPubSub(), EventLoop(), []
    client = type("Client", (), {"pubsub": lambda self: pubsub})()
    bell = Doorbell(lambda: client, 0, loop, lambda: rings.append(1))
    bell.watch([QUEUE])
    return bell, pubsub, loop, rings


def test_it_subscribes_to_its_lists_and_its_probe():
    bell, pubsub, loop, _ = doorbell()
    assert pubsub.subscribed == {CHANNEL, keyspace_channel(0, bell.probe_key)}
    assert 42 in loop.readers
    bell.watch([QUEUE, "kronos.kronos-base"])
    assert keyspace_channel(0, "kronos.kronos-base") in pubsub.subscribed


def test_a_push_announced_while_a_pop_ran_means_pop_again():
    """The pop may have run before the push: waiting for the next ring would leave the job for the recheck."""
    bell, pubsub, _, _ = doorbell()
    bell.popping()
    pubsub.announce(CHANNEL, "lpush")
    assert bell.after_empty_pop(heard_within=10) == POP_AGAIN


def test_a_push_already_taken_is_not_popped_again():
    bell, pubsub, _, _ = doorbell()
    bell.popping()
    pubsub.announce(CHANNEL, "lpush")
    pubsub.announce(CHANNEL, "rpop")
    assert bell.after_empty_pop(heard_within=10) == POLL  # and no probe was ever heard


def test_a_push_rings_after_the_stagger_unless_someone_took_it():
    bell, pubsub, loop, rings = doorbell()
    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    assert [seconds for seconds, _ in loop.timers] == [bell.stagger] and not rings
    loop.run_timers()
    assert rings == [1]
    bell.popping()  # the ring made the channel pop

    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    pubsub.announce(CHANNEL, "rpop")  # another worker popped it during this worker's stagger
    loop.readable()
    loop.run_timers()
    assert rings == [1]


def test_a_pop_takes_what_was_announced_before_it():
    bell, pubsub, loop, rings = doorbell()
    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    bell.popping()  # the channel popped on its own (after a job) before the ring came
    loop.run_timers()
    assert not rings


def test_a_heard_probe_lets_an_idle_channel_wait_until_it_is_stale():
    bell, pubsub, _, _ = doorbell()
    assert bell.popping()  # the first empty pop probes
    assert not bell.popping()  # and the next ones not within a second
    assert bell.after_empty_pop(heard_within=10) == POLL
    pubsub.announce(keyspace_channel(0, bell.probe_key), "lpush")
    assert bell.after_empty_pop(heard_within=10) == WAIT_FOR_RING
    assert bell.after_empty_pop(heard_within=0) == POLL


def test_a_lost_subscription_pops_and_polls_until_it_is_back(monkeypatch):
    bell, pubsub, loop, _ = doorbell()
    pubsub.announce(keyspace_channel(0, bell.probe_key), "lpush")
    assert bell.after_empty_pop(heard_within=10) == WAIT_FOR_RING
    pubsub.fail_next_read = True
    assert bell.after_empty_pop(heard_within=10) == POP_AGAIN
    assert not loop.readers and not pubsub.subscribed
    pubsub.fail_next_read = False
    assert bell.after_empty_pop(heard_within=10) == POLL
    bell.watch([QUEUE])  # not at once: a Redis that is away is not asked again on every loop round
    assert not bell.subscribed
    later = wakeup.monotonic() + wakeup.PROBE_INTERVAL
    monkeypatch.setattr(wakeup, "monotonic", lambda: later)
    bell.watch([QUEUE])  # the channel's next pop, a second later, subscribes again
    assert bell.subscribed and CHANNEL in pubsub.subscribed and 42 in loop.readers
