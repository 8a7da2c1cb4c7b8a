"""Writes that must outlive a Redis failover wait for replicas to have them (Redis WAIT).

Redis replicates asynchronously: a master answers a write before any replica has it, and when a replica is
promoted in between (Sentinel's failover, planned or not) the write is gone: the old master, now a replica,
drops what the new one never had. So with KRONOS_REPLICAS_TO_ACK = n > 0 the writes whose loss would lose a
job wait, on the connection that made them, until n replicas have acknowledged them (WAIT n timeout):

- a job's message (every kombu publish: a producer's submit, a worker's retry or delay), ChannelWaitsForReplicas;
- a job's final answer (worker/results.py).

When fewer than n replicas confirm within KRONOS_REPLICA_ACK_TIMEOUT the write may still be on the master, or
may be lost: NotReplicated, a connection error, so kombu's publish retries it (Celery's task_publish_retry) and
then the client raises a retryable error (tasks/client.py: JobNotAccepted). Sending the same job id again is
safe: a job runs once and has one final answer whatever copies of it arrive (worker/claims.py).
"""

from typing import Any

import redis
from kombu.utils.json import dumps

# kombu transport options (celeryconfig.py's broker_transport_options) that set the attributes below
REPLICATION_OPTIONS = ("replicas_to_ack", "replica_ack_timeout")


class NotReplicated(redis.ConnectionError):
    """A write reached the master but not enough replicas confirmed it in time: a failover may lose it."""


def replication_options(replicas_to_ack: int, timeout: float) -> dict[str, Any]:
    return {"replicas_to_ack": replicas_to_ack, "replica_ack_timeout": timeout}


def wait_command(replicas_to_ack: int, timeout: float) -> tuple:
    """The WAIT command to queue on a pipeline right after the write it must cover."""
    return ("WAIT", replicas_to_ack, max(1, round(timeout * 1000)))


def check_acknowledged(acknowledged: int, replicas_to_ack: int, timeout: float, what: str) -> None:
    if acknowledged < replicas_to_ack:
        raise NotReplicated(
            f"{what} reached the Redis master, but {acknowledged} of the {replicas_to_ack} replicas required "
            f"(KRONOS_REPLICAS_TO_ACK) confirmed it within {timeout:g} s: a failover could lose it"
        )


class ChannelWaitsForReplicas:
    """A kombu Redis channel mixin: a message is pushed and WAITed for on one connection, in one round trip.

    Only the plain push (kombu's publish of one message to a queue without x-expires, which is every job) is
    covered; batches and expiring queues (events, control replies) keep kombu's own path."""

    replicas_to_ack = 0
    replica_ack_timeout = 2.0

    def _put(self, queue, message, **kwargs):
        covered = kwargs.get("_publish_batch") is None and not (self._expires and queue in self._expires)
        if not self.replicas_to_ack or not covered:
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, dumps(message))
            pipe.execute_command(*wait_command(self.replicas_to_ack, self.replica_ack_timeout))
            _, acknowledged = pipe.execute()
        check_acknowledged(acknowledged, self.replicas_to_ack, self.replica_ack_timeout, "the message")
