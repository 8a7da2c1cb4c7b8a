"""Idle workers wait for a push onto their queues instead of asking Redis every few milliseconds, and one push
wakes one of them, not all.

The pop (worker/transport.py) is a Lua script, so that taking a job and recording it as unacknowledged are
one step; a script cannot block, so an idle worker used to run it every KRONOS_POLL_INTERVAL_MS: about a
hundred scripts a second per idle worker, on the one thread Redis runs every command on.

Redis can announce list writes itself: with `notify-keyspace-events` holding K (keyspace channels) and l (list
commands) it publishes "lpush" or "rpush" on `__keyspace@<db>__:<key>` for every push, whoever makes it (a
producer's client in any language, the visibility-timeout sweep, the release of a delayed job). But when
every idle worker listens, every push wakes every idle worker's process to take one job (on a host running
twenty workers that herd costs more pickup latency than it saves). So the idle workers of a group (those
serving the same queues) share the work out:

- the listener, one per group, holds the lease kronos:listener:<group> (renewed by its pops, at least every
  LISTENER_RENEW), is subscribed to the queues' announcements through a Doorbell, and pops at once when it
  hears a push;
- every other idle worker of the group waits in a BLPOP on kronos:wake:<group>. Redis hands each item pushed
  there to one blocked client, so a token wakes exactly one worker.

Who listens and who waits is decided inside the pop script (LISTEN_OR_WAIT_LUA, after a pop found nothing):
the lease goes to whoever finds it free, so a group always regains a listener. A pop that takes an item
(HAND_ON_LUA) gives the lease up if it held it and pushes one token per item still queued, and one more if the
group has no listener then: a woken worker pops, and either takes a job (handing on in turn) or becomes the
listener. A listener that stops (Channel.close) resigns the same way; one that is killed loses its lease
within LISTENER_LEASE, and the next waiter whose BLPOP times out (KRONOS_IDLE_RECHECK_SECONDS) takes over.

A worker with jobs in flight and room for more is not idle: it keeps listening on its own, as every worker
did before, and pops after a stagger of its own (WAKE_SPREAD) and only if the item was not announced taken
meanwhile, so an idle listener takes a new job first and the busy worker's batch only what is left.

A push announced while an empty pop ran is popped again at once: the pop may have run before it. The
announcement and the token are only wake-ups: the pop stays the atomic script, so a missed one costs time,
never a job. That announcements arrive is checked, never assumed: an empty pop pushes to a key of the
channel's own (kronos:wake-probe:<id>, in the same script, and deletes it) at most once a second, and the
Doorbell counts as heard only while those pushes are announced to it. Where they are not (a Redis without Kl,
an ACL without the channels, a subscription lost to a failover or made to a master just demoted), the listener
polls every KRONOS_POLL_INTERVAL_MS, says so once in its log, subscribes again on a new connection after three
unheard probes (then every thirty), and keeps probing; the others still wait for tokens.
"""

import contextlib
import hashlib
import logging
import random
import uuid
from collections.abc import Callable, Iterable
from time import monotonic

import redis

from tasks.keys import LISTENER_KEY_PREFIX, PROBE_KEY_PREFIX, WAKE_KEY_PREFIX, keyspace_channel

log = logging.getLogger(__name__)

# an empty pop probes no more often than this, whatever the poll interval
PROBE_INTERVAL = 1.0
UNHEARD_PROBES_TO_SAY_SO = 3  # and to subscribe again on a new connection; then every this many:
UNHEARD_PROBES_TO_RESUBSCRIBE = 30
# What Redis announces when an item lands on a list (a producer's LPUSH, a restore's or a release's RPUSH), and
# when one leaves it (every pop, LMOVE included, is announced as one of these).
PUSH_EVENTS = frozenset({b"lpush", b"rpush", b"linsert"})
POP_EVENTS = frozenset({b"lpop", b"rpop"})
# A busy worker listening beside its group's listener waits up to this long (its own fraction of it, drawn
# once) before it pops, and does not pop if the item was announced taken meanwhile.
WAKE_SPREAD = 0.004
# The listener's lease: a listener killed without resigning is replaced within this plus a waiter's recheck.
LISTENER_LEASE = 3.0
# An idle listener pops at least this often (renewing its lease), whatever KRONOS_IDLE_RECHECK_SECONDS says.
LISTENER_RENEW = LISTENER_LEASE / 3
# Tokens on a group's wake list at most: a burst wakes this many waiters at once; the rest as they hand on.
MAX_TOKENS = 32

# The pop script's lines for the group (worker/transport.py runs them): ARGV[9] the lease key ('' for a channel
# without a Doorbell: no group), ARGV[10] the wake list, ARGV[11] this channel's id, ARGV[12] the lease in
# milliseconds, ARGV[13] '1' when the channel has no job in flight. hand_on() runs after the pop took an item,
# listen_or_wait() after it found none and returns the channel's role: 'listen', 'wait', or false (not idle).
GROUP_LUA = f"""
local lease, wake, me, lease_ms, idle = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13] == '1'
local function hand_on()
  if lease == '' then return end
  if redis.call('GET', lease) == me then redis.call('DEL', lease) end
  local queued = 0
  for _, key in ipairs(KEYS) do queued = queued + redis.call('LLEN', key) end
  if redis.call('EXISTS', lease) == 0 and queued == 0 then queued = 1 end
  local tokens = math.min(queued, {MAX_TOKENS}) - redis.call('LLEN', wake)
  for _ = 1, tokens do redis.call('LPUSH', wake, '1') end
  if tokens > 0 then redis.call('PEXPIRE', wake, lease_ms) end
end
local function listen_or_wait()
  if lease == '' or not idle then return false end
  local holder = redis.call('GET', lease)
  if holder and holder ~= me then return 'wait' end
  redis.call('SET', lease, me, 'PX', lease_ms)
  return 'listen'
end
"""
# A listener that stops hands its lease on. KEYS: the lease, the wake list; ARGV: its id, the lease in ms.
RESIGN = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('LLEN', KEYS[2]) < {MAX_TOKENS} then redis.call('LPUSH', KEYS[2], '1') end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# The pop script's role for a channel that found its lists empty
LISTEN, WAIT = "listen", "wait"

# What an idle channel does after a pop found every list empty:
POP_AGAIN = "pop again"  # just subscribed, or a push was announced since the pop was sent: pop after ring_delay
WAIT_FOR_RING = "wait for a ring"  # announcements arrive: wait for one (or for the recheck)
WAIT_FOR_TOKEN = "wait for a token"  # another worker listens: BLPOP the wake list
POLL = "poll"  # announcements do not arrive: poll

# How a channel's Doorbell stands
LISTENING = "listening"  # the group's listener: subscribed, rings at once
WAITING = "waiting"  # another worker listens: not subscribed to the queues
BUSY = "busy"  # jobs in flight: subscribed, rings after its stagger


def group_of(keys: Iterable[str]) -> str:
    """The group of the channels that watch exactly these lists."""
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


class Doorbell:
    """One channel's part in its group: its subscription to its queues' announcements, its lease keys, its
    state. `hub` is Celery's event loop, `ring` what to call when a watched list holds an item no one has
    taken yet; `client()` gives a client of the channel's pool (it reaches the broker's current master: it
    follows Sentinel), whose pubsub() the subscription uses."""

    def __init__(self, client: Callable[[], redis.Redis], db: int, hub, ring: Callable[[], None]):
        self._client = client
        self._db = db
        self._hub = hub
        self._ring = ring
        self.id = uuid.uuid4().hex
        self.probe_key = f"{PROBE_KEY_PREFIX}{self.id}"
        self._probe_channel = keyspace_channel(db, self.probe_key)
        self.stagger = WAKE_SPREAD * random.random()
        self.lease_key = self.wake_key = ""
        self.state = WAITING
        self._pubsub: redis.client.PubSub | None = None
        self._fd: int | None = None
        self._wanted: frozenset[str] = frozenset()  # the channels of the watched lists
        self._subscribed: frozenset[str] = frozenset()  # those of them this connection is subscribed to
        # per watched list, the items announced pushed minus those announced taken since this channel's last pop
        self._untaken: dict[str, int] = {}
        self._ring_due = False  # a ring is scheduled after the stagger
        self._probed_at = float("-inf")  # when the last probe was sent
        self._heard_at = float("-inf")  # when the last probe was announced to us
        self._unheard_probes = 0  # probes in a row whose announcement did not come before the next one
        self._lost_at = float("-inf")

    @property
    def connected(self) -> bool:
        return self._pubsub is not None

    @property
    def ring_delay(self) -> float:
        return 0.0 if self.state == LISTENING else self.stagger

    def watch(self, keys: Iterable[str]) -> None:
        """Watch exactly these lists: their group's keys, and (unless waiting) their announcements. After a lost
        subscription, connecting is tried again at most once a PROBE_INTERVAL."""
        keys = tuple(keys)
        group = group_of(keys)
        self.lease_key, self.wake_key = f"{LISTENER_KEY_PREFIX}{group}", f"{WAKE_KEY_PREFIX}{group}"
        self._wanted = frozenset(keyspace_channel(self._db, key) for key in keys)
        self._subscribe()

    # What a channel without a Doorbell (no event loop) passes instead: no probe, no group.
    NO_GROUP_ARGUMENTS = ("", "", "", "", "", "")

    def pop_arguments(self, idle: bool) -> list[str | int]:
        """ARGV[8..13] of the pop script (worker/transport.py): the probe key when this pop should push to it (at
        most once a PROBE_INTERVAL), else ''; then GROUP_LUA's."""
        probe = self.probe_key if self._probe_now() else ""
        return [probe, self.lease_key, self.wake_key, self.id, int(LISTENER_LEASE * 1000), "1" if idle else "0"]

    def after_empty_pop(self, role: str | None, heard_within: float) -> str:
        """What to do once a pop found nothing, given the role the script gave (LISTEN, WAIT, or None when this
        channel has jobs in flight): WAIT_FOR_TOKEN when another worker listens; POP_AGAIN if this channel has just
        subscribed, or a push was announced since the pop was sent (it may have come after the pop ran); else
        WAIT_FOR_RING while a probe was announced in the last `heard_within` seconds, else POLL."""
        self.state = {LISTEN: LISTENING, WAIT: WAITING}.get(role, BUSY)
        if self.state == WAITING:
            self._subscribe()
            return WAIT_FOR_TOKEN
        if self._subscribe() or self._read_pending() or self._has_untaken():
            return POP_AGAIN
        return WAIT_FOR_RING if monotonic() - self._heard_at <= heard_within else POLL

    def recheck(self, idle_recheck: float) -> float:
        """Seconds an idle channel waiting for a ring waits at most before it pops anyway."""
        return min(idle_recheck, LISTENER_RENEW) if self.state == LISTENING else idle_recheck

    def resign(self) -> None:
        """Hand the lease on if this channel holds it (it stops): a waiter wakes and takes it."""
        if not self.lease_key:
            return
        try:
            self._client().eval(RESIGN, 2, self.lease_key, self.wake_key, self.id, int(LISTENER_LEASE * 1000))
        except Exception as exc:  # a channel torn down by a lost connection has no client: the lease lapses
            log.debug("could not resign the listener's lease (%r); it lapses within %s s", exc, LISTENER_LEASE)

    def close(self) -> None:
        if self._fd is not None and self._hub is not None:
            self._hub.remove_reader(self._fd)
        self._fd = None
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()
        self._pubsub = None
        self._subscribed = frozenset()

    def _subscribe(self) -> bool:
        """Be subscribed to the watched lists' announcements unless waiting, and to none of them while waiting.
        Returns whether it subscribed to any just now (pushes before that went unheard)."""
        if self._pubsub is None and monotonic() - self._lost_at < PROBE_INTERVAL:
            return False
        wanted = frozenset() if self.state == WAITING else self._wanted
        if self._pubsub is not None and wanted == self._subscribed:
            return False
        try:
            if self._pubsub is None:
                self._connect()
            gone, new = self._subscribed - wanted, wanted - self._subscribed
            if gone:
                self._pubsub.unsubscribe(*gone)
                for channel in gone:
                    self._untaken.pop(channel, None)
            if new:
                self._pubsub.subscribe(*new)
            self._subscribed = wanted
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            return False
        return bool(new)

    def _probe_now(self) -> bool:
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
        unheard = self._unheard_probes
        if unheard == UNHEARD_PROBES_TO_SAY_SO or (unheard > 0 and unheard % UNHEARD_PROBES_TO_RESUBSCRIBE == 0):
            # The subscription may be on a server that is no longer the master (it connected while Sentinel still
            # named the old one): connect again (through the pool, which asks Sentinel) and probe from there.
            self.close()
            self._lost_at = monotonic()
            return False
        self._probed_at = monotonic()
        return True

    def _connect(self) -> None:
        self._pubsub = self._client().pubsub()
        self._pubsub.subscribe(self._probe_channel)  # connects; the confirmation is read with what follows
        self._fd = self._pubsub.connection._sock.fileno()
        self._hub.add_reader(self._fd, self._on_readable)

    def _on_readable(self, *_args) -> None:
        if not (self._read_pending() or self._has_untaken()) or self._ring_due:
            return
        if self.state == LISTENING:
            self._ring()
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
                elif channel in self._subscribed and event in PUSH_EVENTS:
                    self._untaken[channel] = self._untaken.get(channel, 0) + 1
                elif channel in self._subscribed and event in POP_EVENTS:
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
