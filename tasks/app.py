"""The Celery app of producers, workers and Flower (`celery -A tasks.app ...`).

It registers no task body: the worker package registers FORECAST_TASK under that name, and producers,
which do not install the worker's dependencies, enqueue with app.send_task(FORECAST_TASK, ...).
"""

from celery import Celery

from tasks.settings import current_settings

# Read now, so that a bad KRONOS_* variable fails the import, naming the variable, not the first send.
# (Celery itself loads celeryconfig lazily, which also keeps `import celeryconfig` first free of a cycle.)
current_settings()

app = Celery("kronos")
app.config_from_object("celeryconfig")
