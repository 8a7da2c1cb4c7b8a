"""kombu's Redis transport for every process of tasks.app but the workers: Flower, the operator's tools
(`celery inspect|control`, `python -m tasks.control`) and producers. It neither sweeps nor runs Lua.

Every kombu Redis consumer takes part in the visibility-timeout sweep that requeues unacknowledged messages
(kombu's QoS.restore_visible), and Flower and the control commands consume (their event and control-reply
queues). Sweeping takes the unacked mutex, reads any message's payload from the unacked hash and pushes it
back onto any queue: rights the `kronos-monitor` and `kronos-operator` Redis users must not have
(ops/redis_acl.py). The workers sweep; these processes only watch and command.

kombu also keeps an expiring queue's binding alive, and sweeps overdue binding tables, with Lua scripts. A
running script holds every other Redis client off, so only the worker's user may load or run one: here the
binding is refreshed with plain commands, and the sweep of binding tables is left to the workers as well.

A producer's publish waits for replicas when the deployment asks for it (tasks/replication.py), and with
sentinel:// URLs the same channel finds the master through the sentinels (SentinelTransport).
tasks/app.py selects this transport; worker/app.py gives the workers their own.
"""

import time

from kombu.transport import redis

from tasks.replication import REPLICATION_OPTIONS, ChannelWaitsForReplicas


class QoS(redis.QoS):
    def restore_visible(self, start=0, num=10, interval=10):
        """Left to the workers, which all sweep the same Redis."""


class Channel(ChannelWaitsForReplicas, redis.Channel):
    QoS = QoS
    from_transport_options = redis.Channel.from_transport_options + REPLICATION_OPTIONS

    @property
    def _refresh_binding(self):
        return _refresh_binding_without_script

    def sweep_bindings(self, limit=100):
        """Left to the workers: the sweep is a script."""
        return 0


def _refresh_binding_without_script(keys, args, client):
    """kombu's REFRESH_BINDING (same keys and arguments) as two commands, on a client or a pipeline: the
    binding into its table, and the exchange's deadline raised to `ttl` ms from now. The deadline comes
    from this host's clock instead of Redis's; the shortest ttl kombu gives is an hour, far beyond any skew."""
    table, deadlines = keys
    member, exchange, ttl = args
    client.sadd(table, member)
    client.zadd(deadlines, {exchange: int(time.time() * 1000) + int(ttl)}, gt=True)


class Transport(redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, redis.SentinelChannel):
    from_transport_options = redis.SentinelChannel.from_transport_options + REPLICATION_OPTIONS


class SentinelTransport(Transport):
    default_port = redis.SentinelTransport.default_port
    Channel = SentinelChannel
