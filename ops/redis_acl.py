"""Generate the Redis ACL file (users.acl) from the deployment's configuration: least privilege per role.

    python ops/redis_acl.py --secrets-dir /run/secrets --out /data/acl/users.acl [--print-users]
                            [--replication-conf /data/acl/replication.conf]

Reads KRONOS_PRODUCERS, KRONOS_MODELS, KRONOS_QUEUE_PREFIX and KRONOS_BROKER_URL (its DB names the
event and control channels) like every other process, and writes one user per role:

- `default`: off. A connection that does not authenticate can do nothing.
- one user per producer (its KRONOS_PRODUCER name): push to its own queues' priority lists (exact keys) and
  read their depth; write and read its own job records and results ("<producer>:" job ids, tasks/routing.py)
  and listen on their channels; publish (never receive) task-sent events; read the workers' heartbeats.
  Nothing else: no FLUSHALL, CONFIG, KEYS or SCAN, no DEL on a queue, no binding tables (the workers declare
  the queues they consume), no other producer's queue, results or channels, no scripts.
- `kronos-worker`: what Celery, kombu and this worker use (queues, unacked records, results, events,
  control, heartbeats, quotas, dead letters) and nothing administrative. The only user that runs Lua.
- `kronos-monitor` (Flower by default, `python -m worker.health`, `kronos-worker status`): queue and
  dead-letter depths, the heartbeats, and Celery's events. No payload (no LRANGE on any list, no unacked
  record), no control channel (inspect replies carry jobs' arguments, and every other command acts), no Lua.
- `kronos-operator` (`celery inspect|control`, `python -m tasks.control`, Flower with KRONOS_FLOWER_ROLE=
  operator, `python -m tasks.deadletter list|show`): the monitor's rights, plus Celery's control channel and
  its reply lists, the dead letters' contents, and SCRIPT KILL to end a runaway script. No queue writes,
  no results.
- with sentinel:// URLs (Redis Sentinel), two users for the servers themselves: `kronos-replica`, which a
  replica authenticates as to its master (`masteruser`: PSYNC, REPLCONF, PING), and `kronos-sentinel`, which
  the sentinels use on every server (`sentinel auth-user`: the commands Redis's Sentinel documentation lists,
  from INFO and ROLE to REPLICAOF, CONFIG REWRITE and CLIENT KILL). Neither reads or writes a key.
  `--replication-conf` writes the Redis config lines (`masteruser`, `masterauth`) every server of such a
  deployment loads, the master too (after a failover it is a replica); that file holds the replica user's
  password in clear, as Redis needs it: keep it where only Redis reads it.

Passwords never enter the file: each user's is read from `<secrets-dir>/redis-<user>.password` (first line)
and written as its SHA-256 (`#<hex>`), which Redis compares against. A missing password file is an error.
Commands inside Lua scripts are checked too, which is why the worker's list names what its scripts call.
A running script holds every other client off (BUSY), so only the worker may load or run one; the other
roles' kombu processes keep their bindings without scripts (tasks/monitor_transport.py).
Key patterns follow the names in tasks/ and worker/; tests/integration/test_security_acl.py runs a real worker,
producers and Flower against a redis-server started with this file.
"""

import argparse
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from schemas.heartbeat import HEARTBEAT_KEY
from tasks.client import priority_list
from tasks.deadletter import DEAD_LETTER_KEY
from tasks.keys import CONFLICT_KEY_PREFIX, JOB_RECORD_PREFIX, PROBE_KEY_PREFIX, RESULT_KEY_PREFIX, keyspace_channel
from tasks.routing import PRIORITY_STEPS, job_id_prefix, queue_for_model
from tasks.settings import KronosSettings, SettingsError, load_settings

WORKER_USER = "kronos-worker"
MONITOR_USER = "kronos-monitor"
OPERATOR_USER = "kronos-operator"
ROLE_USERS = (WORKER_USER, MONITOR_USER, OPERATOR_USER)
REPLICA_USER = "kronos-replica"
SENTINEL_USER = "kronos-sentinel"
SERVER_USERS = (REPLICA_USER, SENTINEL_USER)
# A replica's link to its master, and what a sentinel sends to watch, promote and reconfigure servers
# (Redis's documentation: "Redis Sentinel: Redis access control list authentication").
SERVER_RULES = {
    REPLICA_USER: "resetkeys resetchannels -@all +psync +replconf +ping",
    SENTINEL_USER: (
        "resetkeys allchannels -@all +multi +exec +ping +subscribe +publish +info +role +slaveof +replicaof "
        "+config|rewrite +client|setname +client|kill +script|kill"
    ),
}

# Every client: authenticate, pick the DB (broker 0, results 1), pipelines, and what clients send on connect
# (redis-py's CLIENT SETINFO exists from Redis 7.2 and may be refused: redis-py ignores that).
CONNECTION = "+ping +hello +auth +select +multi +exec +discard +client|setname +client|id"

PRODUCER_COMMANDS = "+get +mget +set +exists +del +subscribe +unsubscribe +hgetall +wait"
PRODUCER_QUEUE_COMMANDS = "+lpush +llen"

WORKER_COMMANDS = (
    "+brpop +blpop +rpop +lpush +rpush +llen +lrange +lrem +ltrim +del +exists +expire +pexpire +ttl +get +mget +set "
    "+setex +hset +hget +hmget +hdel +hgetall +hexists +hincrby +sadd +srem +smembers +sismember +zadd +zrem +zrange "
    "+zrangebyscore +zrevrangebyscore +zcard +watch +unwatch +publish +subscribe +unsubscribe +psubscribe "
    "+punsubscribe +time +wait +eval +evalsha +script|load +script|exists +info"
)
# Depths (LLEN) and the heartbeats' hash: never a list's contents, which are jobs' payloads.
MONITOR_COMMANDS = "+llen +hgetall +subscribe +unsubscribe +psubscribe +punsubscribe +info"
# What kombu does with a consumer's own expiring queue (Flower's event queue, a control-reply list): bind it
# (SADD, and its deadline with ZADD), count it when declaring, delete it on the way out. A reply list is also
# read and kept alive; events arrive by pub/sub, so nothing is ever pushed onto an event queue's lists.
OWN_QUEUE_COMMANDS = "+sadd +srem +zadd +llen +del"
REPLY_LIST_COMMANDS = "+brpop +rpop +pexpire"


def password_hash(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _broker_db(settings: KronosSettings) -> int:
    path = urlsplit(settings.broker_url.split(";")[0]).path.strip("/")
    return int(path) if path.isdigit() else 0


def _own_queue_keys(exchange: str, queues: str) -> str:
    """A consumer's own queues (glob `queues`) and the binding tables of `exchange`, where kombu binds them."""
    return f"~{queues} ~_kombu.binding.{exchange} ~_kombu.binding_permanent.{exchange} ~_kombu.binding_deadlines"


def producer_rules(producer: str, settings: KronosSettings) -> str:
    prefix = job_id_prefix(producer)
    # The lists a worker pops, as exact keys: a list no worker reads would fill Redis unseen. (Queue names hold
    # no glob character, tasks/settings.py; the file holds the separator's bytes raw, as Redis's own ACL SAVE
    # writes them: its parser splits on spaces and knows no quoting.)
    own_queues = [queue_for_model(model, settings, producer) for model in settings.models]
    queues = " ".join(f"~{priority_list(queue, step)}" for queue in own_queues for step in PRIORITY_STEPS)
    results = f"~{RESULT_KEY_PREFIX}{prefix}* &{RESULT_KEY_PREFIX}{prefix}*"
    # its job records, and the refusals of requests it sent under an id already used (worker/claims.py)
    own = f"{results} ~{JOB_RECORD_PREFIX}{prefix}* %R~{CONFLICT_KEY_PREFIX}{prefix}* %R~{HEARTBEAT_KEY}"
    # The task-sent event (task_send_sent_event), so that Flower lists a job from the moment it is queued. A
    # selector of its own, because an ACL channel grants SUBSCRIBE as much as PUBLISH: the root's SUBSCRIBE
    # stays on the producer's result channels, and the events of every producer stay unread.
    sent_event = f"(+publish &/{_broker_db(settings)}.celeryev/task.sent)"
    return (
        f"resetkeys resetchannels -@all {CONNECTION} {PRODUCER_COMMANDS} {own} ({PRODUCER_QUEUE_COMMANDS} {queues}) "
        f"{sent_event}"
    )


def worker_rules(settings: KronosSettings) -> str:
    db = _broker_db(settings)
    keys = (
        f"~{settings.queue_prefix}.* ~kronos:* ~{RESULT_KEY_PREFIX}* ~_kombu.binding.* ~_kombu.binding_permanent.* "
        # pidbox lists have priority suffixes too
        "~_kombu.binding_deadlines ~unacked ~unacked_index ~unacked_mutex ~*.celery.pidbox*"
    )
    channels = (
        f"&{RESULT_KEY_PREFIX}* &/{db}.celery.pidbox &/{db}.celeryev/* &/{db}.celeryev/worker.* "
        f"&/{db}.celery.pidbox.reply.* "
        # Redis's announcements of pushes onto the queues and onto the worker's wake-up probes (worker/wakeup.py)
        f"&{keyspace_channel(db, settings.queue_prefix + '.*')} &{keyspace_channel(db, PROBE_KEY_PREFIX + '*')}"
    )
    return f"resetkeys resetchannels -@all {CONNECTION} {WORKER_COMMANDS} {keys} {channels}"


def monitor_rules(settings: KronosSettings) -> str:
    db = _broker_db(settings)
    depths = f"%R~{settings.queue_prefix}.* %R~{HEARTBEAT_KEY} %R~{DEAD_LETTER_KEY}"
    # its own event queue (celeryev.<uuid>): events arrive by pub/sub, the list only marks the binding
    events = f"&/{db}.celeryev/* ({OWN_QUEUE_COMMANDS} {_own_queue_keys('celeryev', 'celeryev.*')})"
    return f"resetkeys resetchannels -@all {CONNECTION} {MONITOR_COMMANDS} {depths} {events}"


def operator_rules(settings: KronosSettings) -> str:
    db = _broker_db(settings)
    # Celery's control commands: a broadcast on the pidbox channel, answered in the sender's reply list
    replies = _own_queue_keys("reply.celery.pidbox", "*.reply.celery.pidbox*")
    control = f"(+publish &/{db}.celery.pidbox) ({OWN_QUEUE_COMMANDS} {REPLY_LIST_COMMANDS} {replies})"
    # a runaway script holds every client off: the operator may end one (only the worker runs any)
    return f"{monitor_rules(settings)} +script|kill (+lrange %R~{DEAD_LETTER_KEY}) {control}"


def users(settings: KronosSettings) -> list[str]:
    """Every ACL user this deployment needs: the roles, one per producer, and Sentinel's servers' own."""
    clash = sorted(set(settings.producers) & {*ROLE_USERS, *SERVER_USERS, "default"})
    if clash:
        raise SettingsError(f"KRONOS_PRODUCERS: {', '.join(clash)} is reserved for a role; rename the producer")
    return [*ROLE_USERS, *settings.producers, *(SERVER_USERS if settings.uses_sentinel else ())]


def render(settings: KronosSettings, hashes: Mapping[str, str]) -> str:
    """The ACL file's text; `hashes` maps each of users(settings) to its password_hash."""
    rules = {WORKER_USER: worker_rules(settings), MONITOR_USER: monitor_rules(settings)}
    rules[OPERATOR_USER] = operator_rules(settings)
    rules |= {producer: producer_rules(producer, settings) for producer in settings.producers}
    rules |= SERVER_RULES
    lines = [
        "user default off resetkeys resetchannels -@all",
        *(f"user {user} on {hashes[user]} {rules[user]}" for user in users(settings)),
    ]
    return "\n".join(lines) + "\n"


def read_hashes(user_names: list[str], secrets_dir: Path) -> dict[str, str]:
    return {user: password_hash(read_password(user, secrets_dir)) for user in user_names}


def read_password(user: str, secrets_dir: Path) -> str:
    path = secrets_dir / f"redis-{user}.password"
    try:
        lines = path.read_text().strip().splitlines()
    except OSError as exc:
        raise SystemExit(f"redis_acl.py: no password for {user}: cannot read {path} ({exc.strerror})") from None
    if not lines or not lines[0].strip():
        raise SystemExit(f"redis_acl.py: {path} is empty")
    return lines[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python ops/redis_acl.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--secrets-dir", type=Path, default=Path("/run/secrets"), help="redis-<user>.password files")
    parser.add_argument("--out", type=Path, help="write the ACL file here (default: standard output)")
    parser.add_argument("--print-users", action="store_true", help="list the users whose passwords are needed")
    parser.add_argument("--replication-conf", type=Path, help="write the servers' masteruser/masterauth lines here")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        names = users(settings)
    except SettingsError as exc:
        print(f"redis_acl.py: {exc}", file=sys.stderr)
        return 2
    if args.print_users:
        print("\n".join(names))
        return 0
    text = render(settings, read_hashes(names, args.secrets_dir))
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.chmod(0o640)
    if args.replication_conf is not None:
        if not settings.uses_sentinel:
            print("redis_acl.py: --replication-conf needs sentinel:// URLs (KRONOS_BROKER_URL)", file=sys.stderr)
            return 2
        password = read_password(REPLICA_USER, args.secrets_dir)
        args.replication_conf.parent.mkdir(parents=True, exist_ok=True)
        args.replication_conf.write_text(f"masteruser {REPLICA_USER}\nmasterauth {password}\n")
        args.replication_conf.chmod(0o640)
    return 0


if __name__ == "__main__":
    sys.exit(main())
