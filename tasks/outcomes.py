"""A job's outcome in Redis, written once and for good: the compare-and-set every writer of a result key uses.

Workers write every state of a job through WRITE_STATE (worker/results.py), and so does `kronos-worker purge`
(tasks/purge.py) for the jobs it takes off their queues: PENDING, STARTED, PROGRESS and RETRY may be
replaced; SUCCESS, FAILURE and REVOKED never. The script also marks the job's claim (tasks/keys.py) final, so
that a later copy of the job is acknowledged without running.
"""

# is_final(document): whether a stored result document holds a final state. Documents written through it
# start with their status (Celery's meta dict puts it first), so the prefix answers without decoding.
IS_FINAL_LUA = """
local function is_final(document)
  if not document then return false end
  local status = string.match(document, '^{"status": ?"(%u+)"')
  if not status then
    local ok, decoded = pcall(cjson.decode, document)
    status = ok and type(decoded) == 'table' and decoded['status']
  end
  return status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED'
end
"""

# KEYS: result key, claim key. ARGV: document, state, expiry in seconds (0: none), 1 when the state is final.
# Returns 1 when written, 0 when a final answer was already there.
WRITE_STATE = (
    IS_FINAL_LUA
    + """
if redis.call('HEXISTS', KEYS[2], 'final') == 1 or is_final(redis.call('GET', KEYS[1])) then
  return 0
end
local expires = tonumber(ARGV[3])
if expires > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', expires)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], 'final', ARGV[2])
  redis.call('HDEL', KEYS[2], 'owner', 'lease_until')
  if expires > 0 then redis.call('EXPIRE', KEYS[2], expires) end
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
)
