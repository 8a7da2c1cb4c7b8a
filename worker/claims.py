"""Claim before running: a job runs only in the worker run that holds its claim in Redis.

A job's message can reach workers more than once: the visibility-timeout sweep hands out a job whose ack
was lost, a worker that loses its connection restores what it held (the threads pool cannot cancel the job
still running), a producer sends the same id twice. The claim, `kronos:claim:<id>` (a hash in the result
DB), decides in one Lua script per delivery (one round trip) what this delivery does:

    claimed    no live holder: this run holds the job for a lease (KRONOS_CLAIM_LEASE_SECONDS), renewed
               while it runs (LeaseKeeper), and released when it stores its final answer or retries
    final      the job's final answer is stored: acknowledge without running, whatever the message says
    held       another run holds a live lease: come back when it may have lapsed (its worker died)
    conflict   the id names a different request (another digest, in the claim or in the client's job
               record): never run; the refusal is kept under kronos:conflict:<id>

A claim that takes over a lapsed lease is a second run of the job (its first worker died, or lost Redis
for longer than the lease): counted in the claim (`takeovers`) and in kronos_job_takeovers_total. The
final write (worker/results.py) still lets only the first answer stand.
"""

import json
import logging
import threading
import uuid
from dataclasses import dataclass

from schemas import ErrorCode, JobError
from tasks.keys import CLAIM_KEY_PREFIX, CONFLICT_KEY_PREFIX, JOB_RECORD_PREFIX, RESULT_KEY_PREFIX
from tasks.outcomes import IS_FINAL_LUA

log = logging.getLogger(__name__)

CLAIMED, FINAL, HELD, CONFLICT = "claimed", "final", "held", "conflict"

# KEYS: claim, result key, the client's job record. ARGV: run token, lease in ms, request digest, expiry in s.
CLAIM = (
    IS_FINAL_LUA
    + """
local claim = KEYS[1]
local digest = redis.call('HGET', claim, 'digest')
if not digest then
  local ok, record = pcall(cjson.decode, redis.call('GET', KEYS[3]) or 'null')
  if ok and type(record) == 'table' and type(record['digest']) == 'string' then digest = record['digest'] end
end
if digest and digest ~= ARGV[3] then return {'conflict', digest} end
local final = redis.call('HGET', claim, 'final')
if final then return {'final', final} end
if is_final(redis.call('GET', KEYS[2])) then return {'final', 'stored'} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local owner = redis.call('HGET', claim, 'owner')
local lease_until = tonumber(redis.call('HGET', claim, 'lease_until') or '0')
if owner and owner ~= ARGV[1] and lease_until > now then return {'held', tostring(lease_until - now)} end
if owner then redis.call('HINCRBY', claim, 'takeovers', 1) end
local runs = redis.call('HINCRBY', claim, 'runs', 1)
redis.call('HSET', claim, 'owner', ARGV[1], 'lease_until', now + tonumber(ARGV[2]), 'digest', ARGV[3])
redis.call('EXPIRE', claim, tonumber(ARGV[4]))
return {'claimed', tostring(runs), owner and '1' or '0'}
"""
)

# KEYS: claim. ARGV: run token, lease in ms. Extends the lease if this run still holds it.
RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
return 1
"""

# KEYS: claim. ARGV: run token. Gives the job up without an answer (it was sent back for a retry or delay).
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
return 1
"""


@dataclass(frozen=True)
class Claim:
    state: str  # CLAIMED, FINAL, HELD or CONFLICT
    token: str  # this delivery's run token (the owner it claims as)
    runs: int = 0  # CLAIMED: how many runs the job has had, this one included
    takeover: bool = False  # CLAIMED: it took over another run's lapsed lease
    held_seconds: float = 0.0  # HELD: until the holder's lease lapses, unless renewed
    detail: str = ""  # FINAL: the stored state; CONFLICT: the digest the id already names


class Claims:
    """Claims of one worker process on the result DB (the same Redis as the results, so that the final write
    and the claim change together)."""

    def __init__(self, client, lease_seconds: float, expires_seconds: int):
        self.client = client
        self.lease_ms = int(lease_seconds * 1000)
        self.expires_seconds = expires_seconds
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    def claim(self, job_id: str, digest: str) -> Claim:
        token = uuid.uuid4().hex
        keys = [CLAIM_KEY_PREFIX + job_id, RESULT_KEY_PREFIX + job_id, JOB_RECORD_PREFIX + job_id]
        raw = self._claim(keys=keys, args=[token, self.lease_ms, digest, self.expires_seconds])
        reply = [part.decode() if isinstance(part, bytes) else part for part in raw]
        state = reply[0]
        if state == CLAIMED:
            return Claim(CLAIMED, token, runs=int(reply[1]), takeover=reply[2] == "1")
        if state == HELD:
            return Claim(HELD, token, held_seconds=int(reply[1]) / 1000)
        return Claim(state, token, detail=reply[1])

    def release(self, job_id: str, token: str) -> None:
        """Best effort: an unreleased lease only delays another run of the job until it lapses."""
        try:
            self._release(keys=[CLAIM_KEY_PREFIX + job_id], args=[token])
        except Exception as exc:
            log.warning("job %s: claim not released (%r); it lapses by itself", job_id, exc)

    def renew(self, held: dict[str, str]) -> None:
        """Extend the leases of the jobs this process runs ({job id: token}), in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, token in held.items():
                self._renew(keys=[CLAIM_KEY_PREFIX + job_id], args=[token, self.lease_ms], client=pipe)
            pipe.execute()

    def record_conflict(self, job_id: str, digest: str, existing: str) -> JobError:
        error = JobError(
            code=ErrorCode.JOB_ID_CONFLICT,
            message=f"job_id: {job_id!r} already names a different request; this one was not run (resend it "
            "under a new id)",
            field="job_id",
            details={"request_digest": digest, "existing_digest": existing},
            job_id=job_id,
        )
        try:
            self.client.set(CONFLICT_KEY_PREFIX + job_id, json.dumps(error.model_dump(mode="json")),
                            ex=self.expires_seconds)  # fmt: skip
        except Exception as exc:
            log.warning("job %s: the conflict was not recorded (%r)", job_id, exc)
        return error


class LeaseKeeper:
    """Renews the leases of the jobs this process runs, every third of the lease, until stopped."""

    def __init__(self, claims: Claims, lease_seconds: float):
        self.claims = claims
        self.interval = lease_seconds / 3
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kronos-lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self._held[job_id] = token

    def let_go(self, job_id: str, token: str) -> None:
        with self._lock:
            if self._held.get(job_id) == token:
                del self._held[job_id]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                self.claims.renew(held)
            except Exception as exc:  # Redis away: the leases may lapse, and another worker may run the job
                log.warning("%d lease(s) not renewed (%r)", len(held), exc)
