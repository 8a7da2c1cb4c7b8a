"""Per-producer quotas: a token bucket per producer in Redis, shared by every worker of every model.

A producer's bucket holds up to its per-minute quota of jobs and refills continuously at quota / 60 per
second, so a producer may send a minute's worth at once and then its quota's rate. A job takes one token
when a worker first admits it (attempt 0); its retries after a worker-side failure are not charged again.
The producer is the one whose queue the job came from (tasks/routing.py), never a name the job states.

Over quota, a job either fails at once with RATE_LIMITED (mode "reject"), or (mode "wait") reserves the
bucket's next free token and goes back to its queue until then: the bucket goes into debt, so each waiting
job is put back once, at its own slot, however long the backlog. A job whose slot is more than
KRONOS_QUOTA_MAX_WAIT seconds away fails with RATE_LIMITED. The reservation is kept in Redis under the job's
id, where producers cannot write. Redis's clock (TIME) is the bucket's clock, so workers on hosts with
skewed clocks agree.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import redis

QUOTA_KEY_PREFIX = "kronos:quota:"
RESERVATION_KEY_PREFIX = "kronos:quota-reserved:"
QUOTA_MODES = ("reject", "wait")

# KEYS: the bucket (hash: tokens, at), the job's reservation. ARGV: capacity, tokens per second, the most
# tokens the bucket may owe (0: never reserve), seconds a reservation is kept.
# Returns {1, 0}: admitted now; {2, ms}: a token reserved ms from now; {0, ms}: refused, a token in ms.
TAKE_TOKEN = """
if redis.call('DEL', KEYS[2]) == 1 then
  return {1, 0}
end
local capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_debt, reservation_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or capacity
local at = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local verdict, wait = 1, 0
if tokens - 1 < -max_debt then
  verdict, wait = 0, (1 - tokens) / rate
else
  tokens = tokens - 1
  if tokens < 0 then
    verdict, wait = 2, -tokens / rate
    redis.call('SET', KEYS[2], '1', 'EX', math.ceil(wait) + reservation_ttl)
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((capacity + max_debt) / rate) + 60)
return {verdict, math.ceil(wait * 1000)}
"""


@dataclass(frozen=True)
class QuotaPolicy:
    per_minute: int  # for producers without their own entry; 0: no limit
    per_producer: Mapping[str, int]
    mode: str  # reject or wait
    max_wait: float  # seconds after sending that a waiting job gives up (mode wait)

    def limit_of(self, producer: str) -> int:
        return self.per_producer.get(producer, self.per_minute)


ADMITTED, RESERVED, REFUSED = 1, 2, 0


@dataclass(frozen=True)
class Verdict:
    outcome: int  # ADMITTED, RESERVED (run the job `wait` seconds from now) or REFUSED
    wait: float  # seconds until the reserved token, or until a token is free when refused
    limit_per_minute: int


class ProducerQuotas:
    def __init__(self, client: redis.Redis, policy: QuotaPolicy, reservation_ttl: float):
        self.policy = policy
        self.reservation_ttl = math.ceil(reservation_ttl)  # how late a reserved job may come back
        self._take = client.register_script(TAKE_TOKEN)

    def take(self, producer: str, job_id: str) -> Verdict:
        """Charge job `job_id` to `producer`'s bucket (a job coming back to its reserved token passes)."""
        limit = self.policy.limit_of(producer)
        if limit == 0:
            return Verdict(ADMITTED, 0.0, 0)
        rate = limit / 60
        max_debt = rate * self.policy.max_wait if self.policy.mode == "wait" else 0
        keys = [QUOTA_KEY_PREFIX + producer, RESERVATION_KEY_PREFIX + job_id]
        outcome, wait_ms = self._take(keys=keys, args=[limit, rate, max_debt, self.reservation_ttl])
        return Verdict(int(outcome), wait_ms / 1000, limit)
