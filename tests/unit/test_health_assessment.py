"""`python -m worker.health`'s verdict on the heartbeats it reads (worker.health.assess), without Redis."""

import time

from schemas import HEARTBEAT_KEY, WorkerHeartbeat
from worker.health import assess


def beat(worker: str, *, ready=True, age=0.0, model="kronos-small", reason=None) -> bytes:
    now = time.time()
    heartbeat = WorkerHeartbeat(
        worker=worker, queue=f"kronos.{model}", model=model, ready=ready, reason=reason, pid=1,
        started_at=now - 100, updated_at=now - age, interval=10,
    )  # fmt: skip
    return heartbeat.model_dump_json().encode()


def test_assess_requires_every_selected_worker_fresh_and_ready():
    now = time.time()
    fields = {
        b"gpu0@h": beat("gpu0@h"),
        b"gpu1@h": beat("gpu1@h", ready=False, reason="model not loaded yet"),
        b"gpu0@other": beat("gpu0@other", age=3600),
        b"cpu@h": beat("cpu@h", model="kronos-base", age=31),
    }
    assert assess(fields, worker="gpu0@h", model=None, host="h", now=now) == (True, "ok: gpu0@h ready")
    assert assess(fields, worker=None, model=None, host="h", now=now) == (
        False,
        "cpu@h: last heartbeat 31 s ago (every 10 s): gone or stuck; gpu1@h: not ready: model not loaded yet",
    )
    assert assess(fields, worker=None, model="kronos-base", host="h", now=now)[0] is False
    assert assess(fields, worker=None, model="kronos-small", host="other", now=now)[0] is False
    assert assess(fields, worker=None, model="kronos-mini", host="h", now=now) == (
        False,
        f"no heartbeat of *@h serving kronos-mini in Redis hash {HEARTBEAT_KEY}",
    )
    # an unreadable field is a reason, not a crash of the health check
    assert assess({b"gpu0@h": b"{not json"}, worker=None, model=None, host="h", now=now) == (
        False,
        "gpu0@h: unreadable heartbeat",
    )
    # a heartbeat just inside three intervals is still fresh
    assert assess({b"x@h": beat("x@h", age=29)}, worker=None, model=None, host="h", now=now)[0] is True
