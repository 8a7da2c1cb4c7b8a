"""The Celery app of producers, workers and Flower (`celery -A tasks.app ...`).

It registers no task body: the worker package registers FORECAST_TASK under that name, and producers,
which do not install the worker's dependencies, enqueue with app.send_task(FORECAST_TASK, ...).
"""

import os
import sys
from pathlib import Path

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

# Flower, the operator's tools and producers neither sweep unacknowledged jobs back into the queues nor run
# Lua, which their Redis users may not do (tasks/monitor_transport.py); a worker sets its own transport
# (worker/app.py: broker_transport, which wins over the URL's scheme). An alias rather than broker_transport
# here, so the URL scheme stays redis(s)://, which Flower's broker page needs.
TRANSPORT_ALIASES.update(dict.fromkeys(("redis", "rediss"), "tasks.monitor_transport:Transport"))
TRANSPORT_ALIASES["sentinel"] = "tasks.monitor_transport:SentinelTransport"

# Flower reads its configuration file from its working directory unless told otherwise: started anywhere else,
# it would skip flowerconfig.py, which refuses to start without authentication, and serve every page to anyone.
# So `celery -A tasks.app flower` (or worker.app) reads this project's file wherever it starts (FLOWER_CONF,
# which --conf still overrides), and does not start where the file is missing.
FLOWER_CONFIG = Path(__file__).resolve().parent.parent / "flowerconfig.py"
if "flower" in sys.argv[1:]:
    if not FLOWER_CONFIG.is_file():
        raise SystemExit(f"tasks/app.py: refusing to start Flower without its configuration {FLOWER_CONFIG}")
    os.environ.setdefault("FLOWER_CONF", str(FLOWER_CONFIG))

app = Celery("kronos")
# Read when the configuration is first needed (a send, a worker's start), not now: importing the app never fails
# on a bad KRONOS_* variable; the command that needs the settings reports it (tasks/settings.py).
app.config_from_object("celeryconfig")
