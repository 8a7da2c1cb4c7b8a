"""kombu's Redis transport for monitors (Flower): it never sweeps the job queues' unacknowledged messages.

Every kombu Redis consumer takes part in the visibility-timeout sweep that requeues unacknowledged messages
(kombu's QoS.restore_visible), and Flower consumes (its event and control-reply queues). Sweeping takes the
unacked mutex, reads any message's payload from the unacked hash and pushes it back onto any queue: rights
the read-mostly `kronos-monitor` Redis user must not have (ops/redis_acl.py). The workers sweep; Flower
only watches. flowerconfig.py selects this transport.
"""

from kombu.transport import redis


class QoS(redis.QoS):
    def restore_visible(self, start=0, num=10, interval=10):
        """Left to the workers, which all sweep the same Redis."""


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
