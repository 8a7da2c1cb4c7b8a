"""Flower's configuration: `celery -A tasks.app flower` reads this file from its working directory.

Flower executes it and takes every top-level name that matches one of its options. Settings come from
KRONOS_FLOWER_* variables (docs/CONFIGURATION.md); Flower's own --options and FLOWER_* variables still work.

- Authentication is required: KRONOS_FLOWER_BASIC_AUTH=user:password[,user2:password2]. Flower refuses to
  start without any (unless --basic-auth, --auth or FLOWER_BASIC_AUTH provide one, or
  KRONOS_FLOWER_UNAUTHENTICATED=1 says the network is trusted). /metrics and /healthcheck stay open, as
  Flower always leaves them, for Prometheus and probes.
- State persists (tasks, workers, counters) in KRONOS_FLOWER_DB, saved every KRONOS_FLOWER_STATE_SAVE_INTERVAL
  seconds and at shutdown, so a restarted Flower still lists recent jobs.
- The tasks page shows each job's series id, model and horizon, never its candles: `format_task` below.
- Flower never sweeps unacknowledged jobs back into the queues (tasks/monitor_transport.py): the workers do.
"""

import os
import re

from kombu.transport import TRANSPORT_ALIASES
from tornado.options import options as _given  # what the command line and FLOWER_* set before this file

# Read before Flower connects: it watches and leaves the requeueing of unacknowledged jobs to the workers,
# so it can run as the read-mostly kronos-monitor Redis user (ops/redis_acl.py). The URL scheme stays
# redis(s)://, which Flower's broker page needs.
TRANSPORT_ALIASES.update(dict.fromkeys(("redis", "rediss"), "tasks.monitor_transport:Transport"))

address = os.environ.get("KRONOS_FLOWER_ADDRESS", "").strip() or "127.0.0.1"
port = int(os.environ.get("KRONOS_FLOWER_PORT", "").strip() or 5555)

_credentials = [item.strip() for item in os.environ.get("KRONOS_FLOWER_BASIC_AUTH", "").split(",") if item.strip()]
if any(not user or not password for user, _, password in (item.partition(":") for item in _credentials)):
    # the value itself is not repeated: it holds passwords
    raise SystemExit("flowerconfig.py: KRONOS_FLOWER_BASIC_AUTH must be user:password[,user:password...]")
if _credentials:
    basic_auth = _credentials
elif not (_given.basic_auth or _given.auth or os.environ.get("KRONOS_FLOWER_UNAUTHENTICATED") == "1"):
    raise SystemExit(
        "flowerconfig.py: refusing to start Flower without authentication: set KRONOS_FLOWER_BASIC_AUTH="
        "user:password (or KRONOS_FLOWER_UNAUTHENTICATED=1 on a trusted network)"
    )

persistent = True
db = os.environ.get("KRONOS_FLOWER_DB", "").strip() or os.path.join(
    os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "kronos", "flower.db"
)
os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
# Flower counts this in milliseconds; 0 would save only at a clean shutdown, and a killed Flower would lose all.
state_save_interval = int(float(os.environ.get("KRONOS_FLOWER_STATE_SAVE_INTERVAL", "").strip() or 60) * 1000)

tasks_columns = "name,uuid,state,args,worker,received,runtime,retries,exception"


# Celery events carry a job's arguments and result as Python reprs cut to 1024 characters, with nested
# lists elided, e.g. "[{'series_id': 'BTC-5m', 'candles': {'open': [...], ...}, 'pred_len': 24, ...}]".
def _field(text, name):
    match = re.search(rf"'{name}': '?([^',}}]*)", text)
    return match.group(1) if match else None


def _job(text):
    """'BTC-5m · kronos-small · 24 steps' from a job's arguments (short enough for the tasks table)."""
    if not text or text == "{}":
        return text
    series, model, steps = (_field(text, name) for name in ("series_id", "model", "pred_len"))
    if series is None:
        return f"({len(text)} characters not shown)"
    horizon = f"{steps} steps" if steps else "future_timestamps"
    return " · ".join(part for part in (series, model, horizon) if part)


def _forecast(text):
    """'BTC-5m · NeoQuasar/Kronos-small@<commit>' from a result: which weights made it, no values."""
    if not text:
        return text
    series, model_id, revision = (_field(text, name) for name in ("series_id", "model_id", "model_revision"))
    return f"{series} · {model_id}@{revision}" if series else f"({len(text)} characters not shown)"


def format_task(task):
    """What Flower's pages show of a job: its identity, horizon and model, no candles and no forecast values."""
    task.args = _job(task.args)
    task.kwargs = _job(task.kwargs)
    task.result = _forecast(task.result)
    return task
