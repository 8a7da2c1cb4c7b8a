"""kombu's Redis transport, made safe against items on the queue that are not message envelopes.

kombu pops an item (BRPOP), parses it and builds a message from it; when either step raises, the
exception escapes the worker's event loop and the worker dies ("Unrecoverable error: JSONDecodeError",
or a KeyError for JSON without `properties`), so one LPUSH of junk by anyone who can write to the queue
stops a worker. Here such an item is logged and moved to the capped list POISON_KEY for inspection,
and consuming goes on. Only workers use this transport (`broker_transport`); the item was already
popped, so nothing is redelivered either way.

It also keeps a worker alive through a broker restart: on connection loss Celery releases the
connection, and kombu then restores the worker's unacknowledged messages through a transport that
has already been detached (an AttributeError that Celery's error filter does not catch, so the worker
died with "Unrecoverable error"). Those messages are still recorded in Redis's `unacked` hash, so the
visibility-timeout sweep requeues them; QoS below leaves them to it and the worker reconnects.

And it closes kombu's loss window at delivery: kombu pops a message with BRPOP and records it as
unacknowledged in a second, separate write, so a message popped while Redis shuts down (the pop is
already in the AOF, the reply never reaches the worker) vanishes. Here one Lua script pops the
highest-priority message and records it in `unacked`/`unacked_index` exactly as kombu's QoS.append
does, atomically; if the reply is lost the sweep requeues it. A script cannot block, so after a pop that
found nothing the channel waits (worker/wakeup.py): as its group's listener, for Redis to announce a push onto
one of its lists, for its next delayed job to be due, or for its lease's renewal; as any other idle worker of
the group, in a BLPOP on the group's wake list, for a token (or for KRONOS_IDLE_RECHECK_SECONDS); with jobs in
flight, for an announcement, an ack, or the recheck. Where Redis announces nothing the listener pops again
after KRONOS_POLL_INTERVAL_MS. (Never a BLPOP with a short timeout: Redis checks blocking timeouts on its
10-per-second cron, so a 5 ms BLPOP waits about 100 ms.)

Identity and admission. A message's delivery_info (exchange, routing key) is written by whoever pushed it,
and kombu restores unacknowledged messages, and Celery sends retries, to the queue it names. Here the queue a
message was actually popped from replaces it, in the unacked record and in what Celery receives, so a
producer's job can neither be restored nor retried into another producer's queue, and the worker can take
the producer's identity from it (tasks/routing.py). Celery never sees a producer's bytes: an item from a
forecast queue passes worker/admission.py, which builds the message Celery gets from the fields a forecast
needs; a refused one goes to POISON_KEY (and a job id of the producer's own is answered with INVALID_INPUT).
Items of other queues (Celery's control replies) reach Celery as kombu would read them.

Delays. A forecast whose eta is still ahead is not delivered: it is parked in Redis's delayed set, and the pop
script puts it back on its list once due (worker/delayed.py), so no worker holds delayed jobs in memory.

Priorities. Each queue's lists are popped in tasks/routing.py's CONSUMPTION_ORDER: 1-4, then the bare list
(kombu's 0, where every job sent without a priority lands) together with 5, then 6-9.

Fairness. Queues are polled round-robin, each queue's priority lists in order before the next queue's
(kombu polls all queues' priority 0 lists first): on a worker serving several producers' queues, one
producer's urgent jobs cannot keep the others' jobs waiting.
"""

import binascii
import json
import logging
from functools import cached_property
from time import monotonic, time

from celery.utils.dispatch import Signal
from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.keys import DELAYED_KEY
from tasks.replication import REPLICATION_OPTIONS, ChannelWaitsForReplicas
from tasks.routing import CONSUMPTION_ORDER, serving_queues
from tasks.settings import current_settings
from worker import admission, delayed, wakeup
from worker.settings import current_worker_settings
from worker.wakeup import POP_AGAIN, PROBE_INTERVAL, WAIT_FOR_RING, WAIT_FOR_TOKEN, Doorbell

log = logging.getLogger(__name__)

POISON_KEY = "kronos:poison"
MAX_POISON = 1000
# Never written: without an event loop (kombu's drain_events), BLPOP on it is the wait between two pops.
IDLE_KEY = "kronos:idle"
# A wake-up may come this early (the event loop sleeps in whole milliseconds): close enough to pop.
IDLE_SLACK = 0.002

# Sent for every item refused from a forecast queue, with its queue, the reason and its job id (or None):
# the Serving step (worker/steps.py) counts them, and answers a producer's own job id with INVALID_INPUT.
message_refused = Signal(name="kronos_message_refused", providing_args={"queue", "reason", "job_id"})

# KEYS: the queues' lists in consumption order; ARGV: unacked hash, unacked index, now, poison list, poison cap,
# largest item in bytes, the delayed set, the wake-up probe's key or '', the group's five (wakeup.GROUP_LUA; ''
# and four ignored values for a channel without a Doorbell), then from ARGV[14] the queue of each key. First the
# delayed jobs that are due go
# back onto their lists (worker/delayed.py). The entry is what kombu's QoS.append writes, [raw message,
# exchange, routing key], with the queue popped from as both exchange and routing key (each queue has a direct
# exchange of its own name), and the raw JSON kept byte for byte (decoding and re-encoding in Lua would turn
# empty lists into objects). An item that cannot be recorded so (not JSON, no properties, a delivery tag that
# is not a non-empty string) is never delivered: a worker that died holding it would lose it; nor is one whose
# tag is already in flight (its record would replace another message's: a producer could aim that at another's
# job). Nor is an item larger than the limit decoded at all (cjson would hold Redis, and the worker its copy,
# for seconds): all go to the poison list here (a large one cut to its first 4 KiB), and the reply says so:
# {key, false}. A pop that takes an item hands on (wakeup.GROUP_LUA). When every list is empty: {false, false,
# when the next delayed job is due (or false), the channel's role in its group (or false)}, after a push to the
# probe key, if one is given, that the channel's subscription should hear announced.
POP_AND_RECORD = (
    "local delayed, now = ARGV[7], ARGV[3]\n"
    + delayed.RELEASE_DUE_LUA
    + wakeup.GROUP_LUA
    + """
for i, key in ipairs(KEYS) do
  local item = redis.call('RPOP', key)
  if item then
    local tag = nil
    if #item <= tonumber(ARGV[6]) then
      local ok, message = pcall(cjson.decode, item)
      tag = ok and type(message) == 'table' and type(message['properties']) == 'table'
        and message['properties']['delivery_tag']
    else
      item = string.sub(item, 1, 4096)
    end
    if type(tag) == 'string' and tag ~= '' and redis.call('HEXISTS', ARGV[1], tag) == 0 then
      local queue = cjson.encode(ARGV[13 + i])
      redis.call('ZADD', ARGV[2], ARGV[3], tag)
      redis.call('HSET', ARGV[1], tag, '[' .. item .. ',' .. queue .. ',' .. queue .. ']')
      hand_on()
      return {key, item, tag}
    end
    redis.call('LPUSH', ARGV[4], item)
    redis.call('LTRIM', ARGV[4], 0, tonumber(ARGV[5]) - 1)
    return {key, false}
  end
end
if ARGV[8] ~= '' then
  redis.call('LPUSH', ARGV[8], '1')
  redis.call('DEL', ARGV[8])
end
local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')[2]
return {false, false, next_due or false, listen_or_wait()}
"""
)


def _next_round() -> None:
    """A timer callback that does nothing: its expiry alone makes the event loop run a round."""


def _raw_item(exc: ValueError) -> str | bytes:
    # json.JSONDecodeError keeps the document, UnicodeDecodeError the bytes
    return getattr(exc, "doc", None) or getattr(exc, "object", None) or repr(exc)


def _is_envelope(message) -> bool:
    """The shape kombu's virtual Message needs; anything else raises inside kombu."""
    properties = message.get("properties") if isinstance(message, dict) else None
    headers = message.get("headers") if isinstance(message, dict) else None
    return (
        isinstance(properties, dict)
        and "delivery_tag" in properties
        and isinstance(properties.get("delivery_info", {}), dict)
        and (headers is None or isinstance(headers, dict))
        and isinstance(message.get("body", ""), str)
    )


class QoS(redis.QoS):
    """Acks, rejects and restores that meet a detached channel leave the message where it is, in
    Redis's `unacked` hash: the sweep requeues it after the visibility timeout, and a job whose result
    is already stored is then acknowledged without running again (worker_deduplicate_successful_tasks)."""

    def append(self, message, delivery_tag):
        """A message the pop script recorded is only remembered here: kombu's append would write its record a
        second time (and over the producer's bytes, which the sweep is meant to bring back)."""
        if delivery_tag in self.channel.recorded_by_pop:
            self.channel.recorded_by_pop.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def restore_unacked(self, client=None):
        try:
            super().restore_unacked(client)
        except AttributeError as exc:
            self._left_to_sweep(f"{len(self._delivered)} unacknowledged message(s)", exc)

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except AttributeError as exc:
            self._left_to_sweep(f"the ack of {delivery_tag}", exc)
        self._after_settling()

    def reject(self, delivery_tag, requeue=False):
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            self._left_to_sweep(f"the reject of {delivery_tag}", exc)
        self._after_settling()

    def _after_settling(self) -> None:
        """A channel whose last job in flight is settled pops on the event loop's next round (which comes
        within a second: kombu refreshes its bindings every second), not at its recheck: found empty, it is
        idle and joins its group's listener or waiters (worker/wakeup.py). This runs in the pool thread that
        ran the job, so it only sets the time."""
        channel = self.channel
        if isinstance(channel, Channel) and channel._doorbell is not None and channel._is_idle():
            channel._idle_until = 0.0

    @staticmethod
    def _left_to_sweep(what: str, exc: Exception) -> None:
        log.warning("broker connection already torn down (%s): %s left to the visibility-timeout sweep", exc, what)


class Channel(ChannelWaitsForReplicas, redis.Channel):
    QoS = QoS
    from_transport_options = redis.Channel.from_transport_options + REPLICATION_OPTIONS
    _idle_until = 0.0  # after a pop that found nothing: no pop before this monotonic time
    _token_wait: float | None = None  # the next round sends a BLPOP on the group's wake list, with this timeout
    _pending = "EVAL"
    _doorbell: Doorbell | None = None  # with an event loop: this channel's part in its group (worker/wakeup.py)
    _watched_queues: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        # delivery tags the pop script has recorded in `unacked`, until QoS.append takes them (QoS above)
        self.recorded_by_pop: set[str] = set()
        # queues consumed without acks (Celery's control replies): kombu records none of their deliveries
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            # kombu prefixes the keys of its own commands only: the pop script, the delayed set and the
            # project's keys would silently use others, and the worker would consume nothing
            raise ValueError("kombu's global_keyprefix transport option is not supported by the worker's transport: "
                             "give each deployment its own Redis DB or KRONOS_QUEUE_PREFIX instead")  # fmt: skip

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout=None):
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        hub = self.connection.hub
        if hub is not None:
            self._watch_queues(hub)
        idle = self._idle_until - monotonic()
        if idle > IDLE_SLACK and hub is not None:
            return  # a ring, or the wake-up set when the last pop found nothing, brings the event loop back here
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._token_wait is not None and hub is not None:  # another worker listens: wait for a token
            self._pending = "BLPOP"
            self.client.connection.send_command("BLPOP", self._doorbell.wake_key, self._token_wait)
            self._token_wait = None
            return
        if idle > IDLE_SLACK:  # no event loop: wait in Redis (never a timeout of 0, which blocks for good)
            self._pending = "BLPOP"
            self.client.connection.send_command("BLPOP", IDLE_KEY, idle)
            return
        pairs = [(self._q_for_pri(queue, priority), queue) for queue in queues for priority in CONSUMPTION_ORDER]
        group = Doorbell.NO_GROUP_ARGUMENTS if self._doorbell is None else self._doorbell.pop_arguments(self._is_idle())
        self._pending = "EVAL"
        self.client.connection.send_command(
            "EVAL",
            POP_AND_RECORD,
            len(pairs),
            *(key for key, _ in pairs),
            self.unacked_key,
            self.unacked_index_key,
            time(),
            POISON_KEY,
            MAX_POISON,
            self._max_message_bytes,
            DELAYED_KEY,
            *group,
            *(queue for _, queue in pairs),
        )

    def _is_idle(self) -> bool:
        """No job of this channel's is in flight (delivered, not yet acknowledged)."""
        prefetch = self.qos.prefetch_count
        return not prefetch or self.qos.can_consume_max_estimate() >= prefetch

    def _watch_queues(self, hub) -> None:
        if self._doorbell is None:
            db = self.pool.connection_kwargs.get("db", 0)
            self._doorbell = Doorbell(lambda: self.Client(connection_pool=self.pool), db, hub, self._ring)
        queues = tuple(self.active_queues)
        if queues != self._watched_queues or not self._doorbell.connected:  # this runs on every loop round
            self._doorbell.watch(self._q_for_pri(queue, priority) for queue in queues for priority in CONSUMPTION_ORDER)
            self._watched_queues = queues

    def _ring(self) -> None:
        """A watched list was pushed to: pop on the event loop's next round."""
        self._idle_until = 0.0

    def close(self):
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell.resign()
        super().close()

    def _brpop_read(self, **options):
        try:
            try:
                reply = self.client.parse_response(self.client.connection, self._pending, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next round reconnects
                raise
            except self.ResponseError as exc:
                if self._pending != "BLPOP":
                    raise
                # a master demoted while this waited ("UNBLOCKED ... master -> replica"): pop, which finds the
                # new master or fails as a lost connection
                log.warning("the wait for a wake-up token ended: %s", exc)
                self.client.connection.disconnect()
                raise redis.Empty() from None
            if self._pending == "BLPOP" or not reply or reply[0] is None:
                if self._pending == "EVAL":
                    next_due, role = reply[2:4] if reply else (None, None)
                    self._rest(None if next_due is None else float(next_due), role and bytes_to_str(role))
                raise redis.Empty()
            key, item, *tag = reply
            queue, _, priority = bytes_to_str(key).partition(self.sep)
            self._queue_cycle.rotate(queue)
            if item is None:  # the script kept it in the poison list: too large, or not recordable
                self._refused(queue, admission.Refused("too large, or without a delivery tag to record it by, "
                                                       "or with the tag of a message in flight"))  # fmt: skip
                return True
            tag = bytes_to_str(tag[0])
            gate = self._gates.get(queue)
            if gate is None:  # not a forecast queue: Celery's own traffic (control replies), as kombu reads it
                if queue in self._no_ack_queues:  # nothing will settle its record: the sweep would bring it back
                    self._forget(tag)
                else:
                    self.recorded_by_pop.add(tag)
                self._deliver_as_is(item, queue)
                return True
            try:
                message = admission.admit(item, queue, int(priority or 0), gate)
            except admission.Refused as refused:
                self.quarantine(item, f"refused from {queue}: {refused.reason}")
                self._forget(tag)
                self._refused(queue, refused)
                return True
            due = delayed.due_time(message)
            if due is not None:
                self._park(message, bytes_to_str(key), tag, due)
            else:
                self.recorded_by_pop.add(tag)
                self.connection._deliver(message, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _park(self, message: dict, priority_list: str, tag: str, due: float) -> None:
        """Hand a job whose eta is ahead to the delayed set (worker/delayed.py) instead of holding it here."""
        member = delayed.parked_member(message, priority_list)
        try:
            with self.conn_or_acquire() as client:
                client.eval(delayed.PARK, 3, DELAYED_KEY, self.unacked_key, self.unacked_index_key,
                            tag, due, member)  # fmt: skip
        except Exception:  # still recorded as unacknowledged: the sweep brings it back and it is parked then
            log.exception("could not park delayed job %s; the visibility-timeout sweep will bring it back",
                          message["headers"]["id"])  # fmt: skip

    def _rest(self, next_due: float | None, role: str | None) -> None:
        """After an empty pop, by the channel's `role` in its group (worker/wakeup.py): wait for a token; or pop
        again on a ring, or after the poll interval where Redis announces nothing; else after the recheck, or
        when the next delayed job (`next_due`, a time() value) is due if that is sooner; or, when a push was
        announced while this pop ran, after this worker's ring delay. The wake-up is set here, while the event
        loop handles this reply, because the loop computes how long it may sleep before it asks the channels to
        poll."""
        worker = current_worker_settings()
        interval = worker.poll_interval
        if self._doorbell is not None:
            then = self._doorbell.after_empty_pop(role, heard_within=worker.idle_recheck + PROBE_INTERVAL)
            if then == WAIT_FOR_TOKEN:
                # kombu drops a BLPOP as stale after brpop_timeout + health_check_interval: wait less than that
                self._token_wait = min(worker.idle_recheck, self.health_check_interval or worker.idle_recheck)
                self._idle_until = 0.0
                return
            if then == POP_AGAIN:
                interval = self._doorbell.ring_delay
            elif then == WAIT_FOR_RING:
                interval = self._doorbell.recheck(worker.idle_recheck)
                if next_due is not None:
                    interval = max(worker.poll_interval, min(interval, next_due - time()))
        self._idle_until = monotonic() + interval
        if self.connection.hub is not None:
            self.connection.wake_after(interval)

    def _deliver_as_is(self, item: bytes, queue: str) -> None:
        try:
            message = loads(bytes_to_str(item))
        except ValueError as exc:
            self._quarantine(exc)
            return
        self.connection._deliver(message, queue)

    @cached_property
    def _gates(self) -> dict[str, admission.Gate]:
        """Forecast queue -> what admission checks its items against, for every served model's queues."""
        settings, worker = current_settings(), current_worker_settings()
        return {
            queue: admission.Gate(
                producer=producer,
                max_message_bytes=self._max_message_bytes,
                max_delay_seconds=float(settings.visibility_timeout),
                max_retries=worker.max_retries,
            )
            for model in settings.models
            for queue, producer in serving_queues(model, settings).items()
        }

    @cached_property
    def _max_message_bytes(self) -> int:
        return admission.max_message_bytes(current_settings().limits.max_payload_bytes)

    def _refused(self, queue: str, refused: admission.Refused) -> None:
        log.error("refused an item from %s (kept in %s): %s", queue, POISON_KEY, refused.reason)
        if queue in self._gates:  # metric labels stay the served queues
            message_refused.send(sender=self, queue=queue, reason=refused.reason, job_id=refused.job_id)

    def drop(self, message, reason: str) -> None:
        """Quarantine a decoded message and forget its unacknowledged record, so the sweep does not bring it back."""
        self.quarantine(json.dumps(message), reason)
        properties = message.get("properties") if isinstance(message, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if isinstance(tag, str):
            self._forget(tag)

    def _forget(self, tag: str) -> None:
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.zrem(self.unacked_index_key, tag)
                pipe.hdel(self.unacked_key, tag)
                pipe.execute()
        except Exception:  # the sweep then brings it back once more, and it is refused again
            log.exception("could not forget the refused message's unacked record")

    def _get(self, queue):
        try:
            return super()._get(queue)
        except ValueError as exc:
            self._quarantine(exc)
            raise redis.Empty() from None

    def _quarantine(self, exc: ValueError) -> None:
        self.quarantine(_raw_item(exc), str(exc))

    def quarantine(self, item: str | bytes, reason: str) -> None:
        log.error("dropped an item from the queue (kept in %s): %s", POISON_KEY, reason)
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.lpush(POISON_KEY, item)
                pipe.ltrim(POISON_KEY, 0, MAX_POISON - 1)
                pipe.execute()
        except Exception:  # the quarantine is a convenience; consuming must go on
            log.exception("could not keep the dropped item")


class Transport(redis.Transport):
    Channel = Channel
    hub = None  # Celery's event loop, once the worker registers this transport with it

    def register_with_event_loop(self, connection, loop):
        self.hub = loop
        super().register_with_event_loop(connection, loop)

    def wake_after(self, seconds: float) -> None:
        """Have the event loop run a round (and so poll the channels) `seconds` from now. Always a timer of its
        own, even when a round is due sooner: that round finds the channel still idle, and a timer it set then
        would not shorten the loop's sleep (the loop reads its timers before it asks the channels to poll), so
        the channel would sleep until an unrelated timer, up to a second."""
        self.hub.call_later(seconds, _next_round)

    def _deliver(self, message, queue):
        if not _is_envelope(message):
            self._quarantine_decoded(message, "JSON that is not a message envelope")
            return
        try:
            super()._deliver(message, queue)
        except binascii.Error as exc:  # a body that is not the base64 its body_encoding says
            self._quarantine_decoded(message, f"undecodable body: {exc}")

    def _quarantine_decoded(self, message, reason: str) -> None:
        channel = next(iter(self.channels), None)
        if channel is None:
            log.error("dropped an item that is not a message envelope: %s", reason)
        else:
            channel.drop(message, reason)


class SentinelChannel(Channel, redis.SentinelChannel):
    """The same channel on the master the sentinels name (sentinel:// URLs): kombu's Sentinel channel builds
    its connection pools, and a connection to a demoted master fails (redis-py turns READONLY into a
    ConnectionError), so the worker reconnects to the new master as after any connection loss."""

    from_transport_options = redis.SentinelChannel.from_transport_options + REPLICATION_OPTIONS


class SentinelTransport(Transport):
    default_port = redis.SentinelTransport.default_port
    Channel = SentinelChannel
