"""The Celery app of producers, workers and Flower (`celery -A tasks.app ...`).

It registers no task body: the worker package registers FORECAST_TASK under that name, and producers,
which do not install the worker's dependencies, enqueue with app.send_task(FORECAST_TASK, ...).
"""

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from tasks.settings import current_settings

# Read now, so that a bad KRONOS_* variable fails the import, naming the variable, not the first send.
# (Celery itself loads celeryconfig lazily, which also keeps `import celeryconfig` first free of a cycle.)
current_settings()

# Flower, the operator's tools and producers neither sweep unacknowledged jobs back into the queues nor run
# Lua, which their Redis users may not do (tasks/monitor_transport.py); a worker sets its own transport
# (worker/app.py: broker_transport, which wins over the URL's scheme). An alias rather than broker_transport
# here, so the URL scheme stays redis(s)://, which Flower's broker page needs.
TRANSPORT_ALIASES.update(dict.fromkeys(("redis", "rediss"), "tasks.monitor_transport:Transport"))

app = Celery("kronos")
app.config_from_object("celeryconfig")
