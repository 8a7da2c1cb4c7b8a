"""Idle workers wait for Redis to announce a push onto their queues instead of asking every few milliseconds.

The pop (worker/transport.py) is a Lua script, so that taking a job and recording it as unacknowledged are
one step; a script cannot block, so an idle worker used to run it every KRONOS_POLL_INTERVAL_MS: about a
hundred scripts a second per idle worker, on the one thread Redis runs every command on.

Redis can announce list writes itself: with `notify-keyspace-events` holding K (keyspace channels) and l (list
commands) it publishes "lpush" or "rpush" on `__keyspace@<db>__:<key>` for every push, whoever makes it (a
producer's client in any language, the visibility-timeout sweep, the release of a delayed job). A Doorbell
subscribes to the lists of its channel's queues on a connection of its own that Celery's event loop watches,
and rings (the channel pops) when one is announced, after a stagger of its own (WAKE_SPREAD) and only if the
item was not announced taken meanwhile, so that one push does not make every idle worker pop. A push announced
while an empty pop ran is popped again at once: the pop may have run before it. The announcement is only a
wake-up: the pop stays the atomic script, so a missed one costs time, never a job. Hence an idle channel still
pops every KRONOS_IDLE_RECHECK_SECONDS, and when its next delayed job is due.

That announcements arrive is checked, never assumed: an empty pop pushes to a key of the channel's own
(kronos:wake-probe:<id>, in the same script, and deletes it) at most once a second, and the Doorbell counts as
heard only while those pushes are announced to it. Where they are not (a Redis without Kl, an ACL without the
channels, a subscription lost to a failover), the channel polls every KRONOS_POLL_INTERVAL_MS as before, says
so once in its log, and keeps probing.
"""

import contextlib
import logging
import random
import uuid
from collections.abc import Callable, Iterable
from time import monotonic

import redis

from tasks.keys import PROBE_KEY_PREFIX, keyspace_channel

log = logging.getLogger(__name__)

# an empty pop probes no more often than this, whatever the poll interval
PROBE_INTERVAL = 1.0
UNHEARD_PROBES_TO_SAY_SO = 3
# What Redis announces when an item lands on a list (a producer's LPUSH, a restore's or a release's RPUSH), and
# when one leaves it (every pop, LMOVE included, is announced as one of these).
PUSH_EVENTS = frozenset({b"lpush", b"rpush", b"linsert"})
POP_EVENTS = frozenset({b"lpop", b"rpop"})
# Every idle worker hears every push, and one job needs one pop. So a worker waits up to this long (its own
# fraction of it, drawn once) before it pops, and does not pop if the item was announced taken meanwhile: one
# or two workers of an idle fleet pop per job instead of all of them (each empty pop is a script in Redis and a
# wake-up on the worker's host), at the cost of at most this much pickup latency.
WAKE_SPREAD = 0.004

# What an idle channel does after a pop found every list empty:
POP_AGAIN = "pop again"  # a push was announced since that pop was sent: pop after this worker's stagger
WAIT_FOR_RING = "wait for a ring"  # announcements arrive: wait for one (or for the recheck)
POLL = "poll"  # announcements do not arrive: poll


class Doorbell:
    """One channel's subscription to its queues' announcements. `hub` is Celery's event loop, `ring` what to
    call when a watched list holds an item no one has taken yet; `client_for_pubsub()` gives a client whose
    pubsub() reaches the broker's current master (the channel's pool: it follows Sentinel)."""

    def __init__(self, client_for_pubsub: Callable[[], redis.Redis], db: int, hub, ring: Callable[[], None]):
        self._client_for_pubsub = client_for_pubsub
        self._db = db
        self._hub = hub
        self._ring = ring
        self.probe_key = f"{PROBE_KEY_PREFIX}{uuid.uuid4().hex}"
        self._probe_channel = keyspace_channel(db, self.probe_key)
        self.stagger = WAKE_SPREAD * random.random()
        self._pubsub: redis.client.PubSub | None = None
        self._fd: int | None = None
        self._watched: frozenset[str] = frozenset()
        # per watched list, the items announced pushed minus those announced taken since this channel's last pop
        self._untaken: dict[str, int] = {}
        self._ring_due = False  # a ring is scheduled after the stagger
        self._probed_at = float("-inf")  # when the last probe was sent
        self._heard_at = float("-inf")  # when the last probe was announced to us
        self._unheard_probes = 0  # probes in a row whose announcement did not come before the next one
        self._lost_at = float("-inf")

    @property
    def subscribed(self) -> bool:
        return self._pubsub is not None

    def watch(self, keys: Iterable[str]) -> None:
        """Be subscribed to the announcements of exactly these lists (a no-op when already so). After a lost
        subscription, tried again at most once a PROBE_INTERVAL."""
        wanted = frozenset(keyspace_channel(self._db, key) for key in keys)
        if self._pubsub is not None and wanted == self._watched:
            return
        if self._pubsub is None and monotonic() - self._lost_at < PROBE_INTERVAL:
            return
        try:
            if self._pubsub is None:
                self._connect()
            gone, new = self._watched - wanted, wanted - self._watched
            if gone:
                self._pubsub.unsubscribe(*gone)
            if new:
                self._pubsub.subscribe(*new)
            self._watched = wanted
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)

    def popping(self) -> bool:
        """The channel is sending a pop, which takes whatever was announced so far. Returns whether that pop
        should push to the probe key (at most once a PROBE_INTERVAL)."""
        self._untaken.clear()
        if self._pubsub is None or monotonic() - self._probed_at < PROBE_INTERVAL:
            return False
        self._unheard_probes = self._unheard_probes + 1 if self._heard_at < self._probed_at else 0
        if self._unheard_probes == UNHEARD_PROBES_TO_SAY_SO:
            log.warning(
                "Redis does not announce pushes onto the queues (its notify-keyspace-events needs K and l, and this "
                "user the %s channels): while idle, this worker polls every KRONOS_POLL_INTERVAL_MS",
                keyspace_channel(self._db, "*"),
            )
        self._probed_at = monotonic()
        return True

    def after_empty_pop(self, heard_within: float) -> str:
        """What to do once a pop found nothing: POP_AGAIN if a push was announced since it was sent (it may have
        come after the pop ran), else WAIT_FOR_RING while a probe was announced in the last `heard_within`
        seconds, else POLL."""
        if self._read_pending() or self._has_untaken():
            return POP_AGAIN
        return WAIT_FOR_RING if monotonic() - self._heard_at <= heard_within else POLL

    def close(self) -> None:
        if self._fd is not None and self._hub is not None:
            self._hub.remove_reader(self._fd)
        self._fd = None
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()
        self._pubsub = None
        self._watched = frozenset()

    def _connect(self) -> None:
        self._pubsub = self._client_for_pubsub().pubsub()
        self._pubsub.subscribe(self._probe_channel)  # connects; the confirmation is read with what follows
        self._fd = self._pubsub.connection._sock.fileno()
        self._hub.add_reader(self._fd, self._on_readable)

    def _on_readable(self, *_args) -> None:
        if not (self._read_pending() or self._has_untaken()) or self._ring_due:
            return
        self._ring_due = True
        self._hub.call_later(self.stagger, self._ring_if_untaken)

    def _ring_if_untaken(self) -> None:
        self._ring_due = False
        if self._has_untaken():
            self._ring()

    def _has_untaken(self) -> bool:
        return any(count > 0 for count in self._untaken.values())

    def _read_pending(self) -> bool:
        """Everything the connection has for us (what redis-py buffered too), counted; True when the connection
        was lost (what happened on the lists meanwhile is unknown: pop)."""
        if self._pubsub is None:
            return False
        try:
            while (message := self._pubsub.get_message(timeout=0)) is not None:
                if message["type"] != "message":
                    continue
                channel, event = message["channel"].decode(), message["data"]
                if channel == self._probe_channel:
                    if event == b"lpush":
                        self._heard_at = monotonic()
                elif channel in self._watched and event in PUSH_EVENTS:
                    self._untaken[channel] = self._untaken.get(channel, 0) + 1
                elif channel in self._watched and event in POP_EVENTS:
                    self._untaken[channel] = max(0, self._untaken.get(channel, 0) - 1)
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            return True
        return False

    def _lost(self, exc: Exception) -> None:
        log.warning("the subscription to queue announcements was lost (%r); polling until it is back", exc)
        self.close()
        self._heard_at = float("-inf")
        self._lost_at = monotonic()
