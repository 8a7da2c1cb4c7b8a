"""Delayed jobs wait in Redis, not in a worker.

Celery holds a message whose eta is in the future in the worker that fetched it until then, and raises the
worker's prefetch limit for each one, so whoever can send jobs with an eta (every producer: retries and
countdowns are ordinary Celery) can make a worker hold any number of them, each up to the byte cap. Here a
worker never holds one. When admission's canonical message has an eta in the future, the transport parks it:
one script moves it from the worker's unacknowledged record into the sorted set kronos:delayed
(tasks/keys.py), scored by its eta, as "<priority list>\\n<message>" with the eta taken out. Every pop
(worker/transport.py's POP_AND_RECORD) first moves up to RELEASE_BATCH due members back onto the right end of
their list, the end that is popped next, in the same script: a delayed job is never in two places, nor in none.

A released message carries no eta, so it runs as soon as a worker pops it, whatever that worker's clock says.
Its expiry still applies. The worker's own retries and the quota's delays travel the same way (they are
messages with a countdown on the job's own queue).
"""

import json
from datetime import datetime
from time import time

# Due members moved back by one pop at most: a backlog of due jobs is released over a few pops, never in one
# long script.
RELEASE_BATCH = 50

# KEYS: the delayed set, the unacked hash, the unacked index; ARGV: delivery tag, due time, member.
PARK = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# The Lua that releases due jobs, for the start of a pop script: `delayed` names the set, `now` the time.
RELEASE_DUE_LUA = f"""
for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, {RELEASE_BATCH})) do
  local split = string.find(member, '\\n', 1, true)
  redis.call('RPUSH', string.sub(member, 1, split - 1), string.sub(member, split + 1))
  redis.call('ZREM', delayed, member)
end
"""


def due_time(message: dict) -> float | None:
    """When a canonical message (worker/admission.py) may run, if that is in the future; else None."""
    eta = message["headers"].get("eta")
    if eta is None:
        return None
    due = datetime.fromisoformat(eta).timestamp()
    return due if due > time() else None


def parked_member(message: dict, priority_list: str) -> str:
    """The delayed set's member for `message`, waiting to go back onto `priority_list` with no eta."""
    released = {**message, "headers": {**message["headers"], "eta": None}}
    return f"{priority_list}\n{json.dumps(released)}"
