"""Purge: take every queued job (delayed ones too) off its queues and answer each with PURGED, in one go.

    kronos-worker purge --yes [--model MODEL ...] [--json]

`celery purge` deletes the messages only, so each purged job's id then reads as queued (its client record
still exists) until the record expires a day later. Here each job taken off is answered at once: a REVOKED
result holding the error PURGED, written with the same compare-and-set as every result (tasks/outcomes.py),
so a job whose answer is already stored keeps it. Jobs a worker has already fetched are not touched; they
run. It needs a Redis user that may delete from the producers' queues and write results: the workers'.
"""

import json
from collections.abc import Iterable
from datetime import UTC, datetime

import redis

from schemas import ErrorCode, JobError
from tasks.client import priority_list
from tasks.keys import CLAIM_KEY_PREFIX, DELAYED_KEY, RESULT_KEY_PREFIX
from tasks.outcomes import WRITE_STATE
from tasks.routing import PRIORITY_STEPS

# KEYS: every list to empty; ARGV: the delayed set, whose members "<list>\n<message>" (worker/delayed.py) of
# those lists are taken too. Returns their items. One script, so no worker pops or releases one in between.
TAKE_ALL = """
local items, lists = {}, {}
for _, key in ipairs(KEYS) do
  lists[key] = true
  for _, item in ipairs(redis.call('LRANGE', key, 0, -1)) do table.insert(items, item) end
  redis.call('DEL', key)
end
for _, member in ipairs(redis.call('ZRANGE', ARGV[1], 0, -1)) do
  local split = string.find(member, '\\n', 1, true)
  if split and lists[string.sub(member, 1, split - 1)] then
    table.insert(items, string.sub(member, split + 1))
    redis.call('ZREM', ARGV[1], member)
  end
end
return items
"""


def purge(broker: redis.Redis, results: redis.Redis, queues: Iterable[str], expires: int) -> list[str]:
    """Empty `queues` (every priority list) and answer each job found with PURGED; returns their ids."""
    keys = [priority_list(queue, priority) for queue in queues for priority in PRIORITY_STEPS]
    items = broker.eval(TAKE_ALL, len(keys), *keys, DELAYED_KEY)
    write_state = results.register_script(WRITE_STATE)
    purged = []
    for item in items:
        job_id = _job_id(item)
        if job_id is None:  # not a job: nothing to answer
            continue
        write_state(keys=[RESULT_KEY_PREFIX + job_id, CLAIM_KEY_PREFIX + job_id],
                    args=[_purged_document(job_id), "REVOKED", expires, 1])  # fmt: skip
        purged.append(job_id)
    return purged


def _job_id(item: bytes) -> str | None:
    try:
        job_id = json.loads(item)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _purged_document(job_id: str) -> str:
    error = JobError(
        code=ErrorCode.PURGED,
        message="the job was taken off its queue by an operator (kronos-worker purge) before it ran",
        job_id=job_id,
    )
    return json.dumps(
        {
            "status": "REVOKED",  # first: the compare-and-set reads a document's state from its start
            "result": {
                "exc_type": "JobFailed",
                "exc_module": "schemas.errors",
                "exc_message": [error.model_dump(mode="json")],
            },
            "traceback": None,
            "children": [],
            "date_done": datetime.now(UTC).isoformat(),
            "task_id": job_id,
        }
    )
