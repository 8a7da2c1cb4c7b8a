"""The Doorbell's decisions (worker/wakeup.py), in-process: what it subscribes to as its group's listener, as a
waiter and with jobs in flight; when an idle channel pops again, waits for a ring or a token, or polls; when a
ring is due. A scripted stand-in for redis-py's PubSub and for Celery's event loop; the pop script's part on a
real redis-server is tests/integration/test_wakeup_group.py, the workers tests/integration/test_idle_workers.py."""

import redis

from tasks.keys import keyspace_channel
from worker import wakeup
from worker.wakeup import LISTEN, POLL, POP_AGAIN, WAIT, WAIT_FOR_RING, WAIT_FOR_TOKEN, Doorbell

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


def doorbell(role: str | None = LISTEN) -> tuple[Doorbell, ScriptedPubSub, EventLoop, list[int]]:
    """A Doorbell whose channel's first pop found nothing and got `role` (None: jobs in flight)."""
    pubsub, loop, rings = ScriptedPubSub(), EventLoop(), []
    client = type("Client", (), {"pubsub": lambda self: pubsub})()
    bell = Doorbell(lambda: client, 0, loop, lambda: rings.append(1))
    bell.watch([QUEUE])
    assert bell.after_empty_pop(role, heard_within=10) == (WAIT_FOR_TOKEN if role == WAIT else POP_AGAIN)
    return bell, pubsub, loop, rings


def probe_heard(bell: Doorbell, pubsub: ScriptedPubSub) -> None:
    pubsub.announce(keyspace_channel(0, bell.probe_key), "lpush")


def test_before_its_first_pop_a_channel_hears_only_its_probe():
    pubsub, loop = ScriptedPubSub(), EventLoop()
    client = type("Client", (), {"pubsub": lambda self: pubsub})()
    bell = Doorbell(lambda: client, 0, loop, lambda: None)
    bell.watch([QUEUE])
    assert pubsub.subscribed == {keyspace_channel(0, bell.probe_key)}
    assert 42 in loop.readers


def test_the_listener_subscribes_to_its_lists_and_pops_again_once_subscribed():
    """Pushes between its pop and its subscription went unheard: the pop after subscribing takes them."""
    bell, pubsub, _, _ = doorbell(LISTEN)
    assert pubsub.subscribed == {CHANNEL, keyspace_channel(0, bell.probe_key)}
    assert bell.after_empty_pop(LISTEN, heard_within=10) == POLL  # subscribed already; no probe heard yet
    probe_heard(bell, pubsub)
    assert bell.after_empty_pop(LISTEN, heard_within=10) == WAIT_FOR_RING


def test_a_waiter_hears_no_push_and_waits_for_a_token():
    bell, pubsub, loop, rings = doorbell(LISTEN)
    assert bell.after_empty_pop(WAIT, heard_within=10) == WAIT_FOR_TOKEN
    assert pubsub.subscribed == {keyspace_channel(0, bell.probe_key)}
    pubsub.announce(CHANNEL, "lpush")  # sent before the unsubscription reached Redis
    loop.readable()
    assert not rings and not loop.timers


def test_the_listener_rings_at_once():
    bell, pubsub, loop, rings = doorbell(LISTEN)
    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    assert rings == [1] and not loop.timers
    assert bell.ring_delay == 0


def test_a_busy_channel_rings_after_its_stagger_unless_someone_took_it():
    bell, pubsub, loop, rings = doorbell(None)
    assert pubsub.subscribed == {CHANNEL, keyspace_channel(0, bell.probe_key)}
    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    assert [seconds for seconds, _ in loop.timers] == [bell.stagger] == [bell.ring_delay] and not rings
    loop.run_timers()
    assert rings == [1]
    bell.pop_arguments(idle=False)  # the ring made the channel pop

    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    pubsub.announce(CHANNEL, "rpop")  # the listener popped it during this worker's stagger
    loop.readable()
    loop.run_timers()
    assert rings == [1]


def test_a_push_announced_while_a_pop_ran_means_pop_again():
    """The pop may have run before the push: waiting for the next ring would leave the job for the recheck."""
    bell, pubsub, _, _ = doorbell(LISTEN)
    bell.pop_arguments(idle=True)
    pubsub.announce(CHANNEL, "lpush")
    assert bell.after_empty_pop(LISTEN, heard_within=10) == POP_AGAIN


def test_a_push_already_taken_is_not_popped_again():
    bell, pubsub, _, _ = doorbell(LISTEN)
    bell.pop_arguments(idle=True)
    pubsub.announce(CHANNEL, "lpush")
    pubsub.announce(CHANNEL, "rpop")
    assert bell.after_empty_pop(LISTEN, heard_within=10) == POLL  # and no probe was ever heard


def test_a_pop_takes_what_was_announced_before_it():
    bell, pubsub, loop, rings = doorbell(None)
    pubsub.announce(CHANNEL, "lpush")
    loop.readable()
    bell.pop_arguments(idle=False)  # the channel popped on its own (after a job) before the ring came
    loop.run_timers()
    assert not rings


def test_a_pop_probes_at_most_once_a_second_and_a_heard_probe_goes_stale():
    bell, pubsub, _, _ = doorbell(LISTEN)
    assert bell.pop_arguments(idle=True)[0] == bell.probe_key  # the first empty pop probes
    assert bell.pop_arguments(idle=True)[0] == ""  # and the next ones not within a second
    probe_heard(bell, pubsub)
    assert bell.after_empty_pop(LISTEN, heard_within=10) == WAIT_FOR_RING
    assert bell.after_empty_pop(LISTEN, heard_within=0) == POLL


def test_the_listener_rechecks_often_enough_to_keep_its_lease():
    listener, busy = doorbell(LISTEN)[0], doorbell(None)[0]
    assert listener.recheck(60) == wakeup.LISTENER_RENEW < wakeup.LISTENER_LEASE
    assert busy.recheck(60) == 60


def test_channels_watching_the_same_lists_share_a_group_and_its_keys():
    first, second, other = doorbell(LISTEN)[0], doorbell(LISTEN)[0], doorbell(LISTEN)[0]
    first.watch([QUEUE, "kronos.kronos-base"])
    second.watch(["kronos.kronos-base", QUEUE])
    other.watch(["kronos.kronos-base"])
    assert first.lease_key == second.lease_key != other.lease_key
    assert first.wake_key == second.wake_key != other.wake_key
    assert first.pop_arguments(idle=True)[1:4] == [first.lease_key, first.wake_key, first.id]
    assert first.pop_arguments(idle=False)[5] == "0" and first.pop_arguments(idle=True)[5] == "1"
    # a channel without a doorbell fills the same places of the script's arguments
    assert len(Doorbell.NO_GROUP_ARGUMENTS) == len(first.pop_arguments(idle=True))


def test_a_lost_subscription_pops_and_polls_until_it_is_back(monkeypatch):
    bell, pubsub, loop, _ = doorbell(LISTEN)
    probe_heard(bell, pubsub)
    assert bell.after_empty_pop(LISTEN, heard_within=10) == WAIT_FOR_RING
    pubsub.fail_next_read = True
    assert bell.after_empty_pop(LISTEN, heard_within=10) == POP_AGAIN
    assert not loop.readers and not pubsub.subscribed
    pubsub.fail_next_read = False
    assert bell.after_empty_pop(LISTEN, heard_within=10) == POLL
    bell.watch([QUEUE])  # not at once: a Redis that is away is not asked again on every loop round
    assert not bell.connected
    later = wakeup.monotonic() + wakeup.PROBE_INTERVAL
    monkeypatch.setattr(wakeup, "monotonic", lambda: later)
    bell.watch([QUEUE])  # the channel's next pop, a second later, subscribes again
    assert bell.connected and CHANNEL in pubsub.subscribed and 42 in loop.readers


def test_unheard_probes_make_it_subscribe_again_on_a_new_connection(monkeypatch):
    """A subscription made while Sentinel still named the demoted master hears nothing the new one announces:
    after a few unheard probes the Doorbell connects again (through the pool, which asks Sentinel)."""
    clock = [1000.0]
    monkeypatch.setattr(wakeup, "monotonic", lambda: clock[0])
    pubsub, loop, connections = ScriptedPubSub(), EventLoop(), []

    def connect():
        connections.append(clock[0])
        return pubsub

    client = type("Client", (), {"pubsub": lambda self: connect()})()
    bell = Doorbell(lambda: client, 0, loop, lambda: None)
    bell.watch([QUEUE])
    bell.after_empty_pop(LISTEN, heard_within=10)
    probes = []
    for _ in range(wakeup.UNHEARD_PROBES_TO_SAY_SO + 2):  # one pop a second, no probe ever announced
        clock[0] += wakeup.PROBE_INTERVAL
        probes.append(bell.pop_arguments(idle=True)[0] != "")
        assert bell.after_empty_pop(LISTEN, heard_within=10) in (POLL, POP_AGAIN)
    assert len(connections) == 2
    assert probes == [True] * wakeup.UNHEARD_PROBES_TO_SAY_SO + [False, False]  # none while reconnecting
    assert pubsub.subscribed == {CHANNEL, keyspace_channel(0, bell.probe_key)} and 42 in loop.readers
