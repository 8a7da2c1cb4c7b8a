"""What each worker process publishes about itself, for `status`, health checks and dashboards.

Every worker writes its heartbeat as one field of the Redis hash HEARTBEAT_KEY (in the broker's DB),
keyed by its Celery hostname (e.g. `gpu0@host`), every `interval` seconds, and deletes it at shutdown.
One hash, not a key per worker, so a reader needs only HGETALL (no SCAN, which ACLs cannot scope).
A reader counts a heartbeat older than STALE_AFTER intervals as a worker that is gone.
"""

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HEARTBEAT_KEY = "kronos:workers"
STALE_AFTER = 3


class WorkerHeartbeat(BaseModel):
    """Unknown fields are ignored so older readers accept newer workers' heartbeats."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    worker: str = Field(description="Celery hostname, e.g. gpu0@host.")
    queue: str = Field(description="The queue it consumes; the first of `queues` when it serves several producers.")
    queues: list[str] = Field(default_factory=list, description="Every queue it consumes, one per producer served.")
    model: str = Field(description="Model name served, e.g. kronos-small.")
    model_id: str | None = None
    model_revision: str | None = None
    tokenizer_id: str | None = None
    tokenizer_revision: str | None = None
    device: str | None = None
    ready: bool = Field(description="Model loaded, broker reachable, taking jobs.")
    reason: str | None = Field(None, description="Why the worker is not ready, when it is not.")
    pid: int
    started_at: float = Field(description="Epoch seconds.")
    updated_at: float = Field(description="Epoch seconds of this heartbeat.")
    interval: float = Field(gt=0, description="Seconds between heartbeats.")
    jobs_in_flight: int = 0
    jobs_done: int = 0
    synthetic_model: bool = False
    precision: str | None = Field(None, description="The engine's precision: float32, or an opt-in lower one.")
    decode_path: str | None = Field(
        None, description="How the decode step runs: compiled (inductor, CUDA graphs on GPU), or eager and why."
    )
    model_update: dict[str, Any] | None = Field(
        None,
        description="The last rolling model update this worker was told to make: id, state (loading, switched, "
        "failed, refused), target model and revision, error when it failed, finished_at.",
    )

    def is_stale(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.updated_at > STALE_AFTER * self.interval
