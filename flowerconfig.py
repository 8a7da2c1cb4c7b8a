"""Flower's configuration: `celery -A tasks.app flower` reads this file from its working directory.

Flower executes it and takes every top-level name that matches one of its options. Settings come from
KRONOS_FLOWER_* variables (docs/CONFIGURATION.md); Flower's own --options and FLOWER_* variables still work.

- Authentication is required: KRONOS_FLOWER_BASIC_AUTH_FILE names a file of user:password lines (a Docker
  secret; KRONOS_FLOWER_BASIC_AUTH=user:password[,user2:password2] outside containers). Flower refuses to
  start without any (unless --basic-auth, --auth or FLOWER_BASIC_AUTH provide one, or
  KRONOS_FLOWER_UNAUTHENTICATED=1 says the network is trusted). /metrics and /healthcheck stay open, as
  Flower always leaves them, for Prometheus and probes.
- KRONOS_FLOWER_ROLE says which Redis user Flower runs as. `monitor` (the default, `kronos-monitor`): it
  watches through events only and sends no control command, neither inspection (whose replies carry jobs'
  arguments) nor shutdown, revoke or pool changes, which that user may not send (ops/redis_acl.py).
  `operator` (`kronos-operator`): Flower's inspection and control buttons work, for whoever has its login.
- State persists (tasks, workers, counters) in KRONOS_FLOWER_DB, saved every KRONOS_FLOWER_STATE_SAVE_INTERVAL
  seconds and at shutdown, so a restarted Flower still lists recent jobs.
- The tasks page shows each job's series id, model and horizon, never its candles: `format_task` below.
- Flower never sweeps unacknowledged jobs back into the queues (tasks/monitor_transport.py): the workers do.
"""

import os
import re

from tornado.options import options as _given  # what the command line and FLOWER_* set before this file

from tasks.settings import FlowerSettings, SettingsError, load

try:
    _settings = load(FlowerSettings)
except SettingsError as exc:
    raise SystemExit(f"flowerconfig.py: {exc}") from None

address = _settings.address
port = _settings.port


def _read_credentials() -> tuple[str, list[str]]:
    """(where they came from, the user:password items) from KRONOS_FLOWER_BASIC_AUTH_FILE or
    KRONOS_FLOWER_BASIC_AUTH; no items when neither is set."""
    if not _settings.basic_auth_file:
        return "KRONOS_FLOWER_BASIC_AUTH", (_settings.basic_auth or "").split(",")
    try:
        with open(_settings.basic_auth_file) as file:
            return "KRONOS_FLOWER_BASIC_AUTH_FILE", file.read().replace(",", "\n").splitlines()
    except OSError as exc:
        raise SystemExit(
            f"flowerconfig.py: KRONOS_FLOWER_BASIC_AUTH_FILE: cannot read {_settings.basic_auth_file} ({exc.strerror})"
        ) from None


_source, _items = _read_credentials()
_credentials = [item.strip() for item in _items if item.strip()]
if any(not user or not password for user, _, password in (item.partition(":") for item in _credentials)):
    # the value itself is not repeated: it holds passwords
    raise SystemExit(f"flowerconfig.py: {_source} must be user:password[,user:password...]")
if _credentials:
    basic_auth = _credentials
elif not (_given.basic_auth or _given.auth or _settings.unauthenticated):
    raise SystemExit(
        "flowerconfig.py: refusing to start Flower without authentication: set KRONOS_FLOWER_BASIC_AUTH_FILE to a "
        "file of user:password lines (or KRONOS_FLOWER_UNAUTHENTICATED=1 on a trusted network)"
    )

role = _settings.role
if role == "monitor":
    from tasks.app import app as _app  # the app Flower was started with (`-A tasks.app`)

    def _refuse_control(command, *args, **kwargs):
        if command == "heartbeat":  # the event receiver's wake-up call: the workers send one every 2 s anyway
            return None
        raise PermissionError(
            f"Flower runs as the monitor (KRONOS_FLOWER_ROLE=monitor): no control command ({command}); "
            "run it as the operator to inspect or control workers"
        )

    # Say so at once instead of sending what Redis refuses (its ACL log would fill with Flower's attempts):
    # every inspection, button and Flower's own periodic enable_events go through broadcast.
    _app.control.broadcast = _refuse_control
    enable_events = False  # the workers send events anyway (celeryconfig.py: worker_send_task_events)

persistent = True
db = _settings.db or os.path.join(
    os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "kronos", "flower.db"
)
os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
# Flower counts this in milliseconds; 0 would save only at a clean shutdown, and a killed Flower would lose all.
state_save_interval = int(_settings.state_save_interval * 1000)

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
