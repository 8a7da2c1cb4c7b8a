"""The kombu internals the worker's transport (worker/transport.py) and Flower's (tasks/monitor_transport.py)
build on. kombu is pinned to one minor (pyproject.toml); the day a new kombu renames or reshapes any of these,
this test fails naming it, before any worker runs on it. Keep the list short: every name here is a reason the
transport could break."""

import inspect
from pathlib import Path

import pytest
from kombu.transport import redis, virtual

# (owner, private or overridden name, the parameters the transport calls or overrides it with; None: an attribute)
CONTRACT = [
    (redis.Channel, "_brpop_start", ["self", "timeout"]),
    (redis.Channel, "_brpop_read", ["self", "options"]),
    (redis.Channel, "_get", ["self", "queue"]),
    (redis.Channel, "_q_for_pri", ["self", "queue", "pri"]),
    (redis.Channel, "_flush_brpop_reauth", ["self"]),
    (redis.Channel, "conn_or_acquire", ["self", "client"]),
    (redis.Channel, "_in_poll", None),
    (redis.Channel, "_brpop_sent_at", None),
    (redis.Channel, "unacked_key", None),
    (redis.Channel, "unacked_index_key", None),
    (redis.Channel, "sep", None),
    (redis.Channel, "connection_errors", None),
    (redis.Channel, "_do_restore_message", ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"]),
    (redis.QoS, "restore_unacked", ["self", "client"]),
    (redis.QoS, "ack", ["self", "delivery_tag"]),
    (redis.QoS, "reject", ["self", "delivery_tag", "requeue"]),
    (redis.Transport, "_deliver", ["self", "message", "queue"]),
    (redis.Transport, "register_with_event_loop", ["self", "connection", "loop"]),
    (redis.Channel, "_queue_cycle", None),
    # one unacked write per delivery: the pop script's; kombu's own append is skipped for it
    (redis.QoS, "append", ["self", "message", "delivery_tag"]),
    (virtual.QoS, "append", ["self", "message", "delivery_tag"]),
    (redis.Channel, "global_keyprefix", None),
    # tasks/replication.py: a job's push and its WAIT on one connection
    (redis.Channel, "_put", ["self", "queue", "message", "kwargs"]),
    (redis.Channel, "_get_message_priority", ["self", "message", "reverse"]),
    (redis.Channel, "_expires", None),
    # sentinel:// URLs: kombu's Sentinel channel builds the pools under ours
    (redis.SentinelChannel, "from_transport_options", None),
    (redis.SentinelChannel, "_sentinel_managed_pool", ["self", "asynchronous"]),
]


@pytest.mark.parametrize(("owner", "name", "parameters"), CONTRACT, ids=[f"{o.__name__}.{n}" for o, n, _ in CONTRACT])
def test_kombu_still_has_what_the_transport_builds_on(owner, name, parameters):
    found = inspect.getattr_static(owner, name, None)
    if found is None and parameters is None:  # instance attributes are set in __init__: look for them there
        # the modules' text, not inspect.getsource: on Python 3.11 that parses with ast, which can fail with
        # "AST constructor recursion depth mismatch" in a process where a RecursionError was caught before
        files = {inspect.getfile(klass) for klass in owner.__mro__ if klass.__module__.startswith("kombu")}
        source = "".join(Path(file).read_text() for file in sorted(files))
        assert f"self.{name}" in source or f"{name} =" in source, f"kombu no longer has {owner.__name__}.{name}"
        return
    assert found is not None, f"kombu no longer has {owner.__name__}.{name}"
    if parameters is not None:
        function = found.__func__ if isinstance(found, staticmethod | classmethod) else found
        assert list(inspect.signature(function).parameters) == parameters, f"{owner.__name__}.{name} changed"


def test_kombu_is_the_pinned_minor():
    import kombu

    assert kombu.__version__.startswith("5.7."), "the transport is written for kombu 5.7: re-check CONTRACT"
