"""The worker's transport writes each delivery's unacknowledged record once: the pop script records it, and
kombu's QoS.append, which would write it again, only remembers it. And it refuses kombu's global_keyprefix,
which its own keys would not follow. In-process kombu against a real redis-server."""

import threading

import pytest
from celery import Celery
from kombu import Connection, Consumer, Producer, Queue

from tasks.routing import queue_for_model
from worker.transport import Transport


def test_a_delivery_writes_its_unacked_record_once(redis_server):
    queue = queue_for_model("kronos-small")
    producer = Celery("producer")
    producer.config_from_object("celeryconfig")
    producer.conf.update(broker_url=redis_server.url(0), result_backend=redis_server.url(1))
    sent = producer.send_task("kronos.forecast", args=[{"series_id": "once"}], queue=queue)
    producer.close()

    writes: list[str] = []
    watcher = redis_server.client(0, decode_responses=True)
    with watcher.monitor() as monitor:
        watching = threading.Event()

        def record_unacked_writes():
            watching.set()
            for command in monitor.listen():
                text = command["command"]
                if text.startswith("HSET unacked ") or text == "QUIT":
                    writes.append(text)
                if "kronos-test-done" in text:
                    return

        thread = threading.Thread(target=record_unacked_writes, daemon=True)
        thread.start()
        watching.wait(5)
        received = []
        with Connection(redis_server.url(0), transport=Transport) as connection:
            consumer = Consumer(connection.default_channel, queues=[Queue(queue)], accept=["json"],
                                callbacks=[lambda body, message: received.append(message)])  # fmt: skip
            with consumer:
                connection.drain_events(timeout=5)
            assert [message.headers["id"] for message in received] == [sent.id]
            received[0].ack()
        redis_server.client(0).get("kronos-test-done")
        thread.join(10)
    assert len([write for write in writes if write.startswith("HSET unacked ")]) == 1, writes


def test_a_global_key_prefix_is_refused_at_start(redis_server):
    options = {"global_keyprefix": "tenant-a:"}
    connection = Connection(redis_server.url(0), transport=Transport, transport_options=options)
    with connection, pytest.raises(ValueError, match="global_keyprefix"):
        connection.default_channel  # noqa: B018 - opening the channel is what refuses


def test_a_delivery_to_a_consumer_without_acks_leaves_no_record(redis_server):
    """Celery's control replies are consumed without acks (kombu's Mailbox): nothing will ever settle their
    record, so the sweep would bring each reply back, and the channel would remember its tag for good."""
    queue = Queue("replies-no-ack")
    with Connection(redis_server.url(0), transport=Transport) as connection:
        Producer(connection.default_channel).publish({"reply": 1}, routing_key=queue.name, declare=[queue])
        received = []
        consumer = Consumer(connection.default_channel, queues=[queue], accept=["json"], no_ack=True,
                            callbacks=[lambda body, message: received.append(body)])  # fmt: skip
        with consumer:
            connection.drain_events(timeout=5)
        assert received == [{"reply": 1}]
        channel = connection.default_channel
        assert channel.recorded_by_pop == set()
        admin = redis_server.client(0)
        assert admin.hlen(channel.unacked_key) == 0
        assert admin.zcard(channel.unacked_index_key) == 0
