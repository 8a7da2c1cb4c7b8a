"""celeryconfig.py's settings as a process started with a given set of KRONOS_* variables loads them; shared by
the unit tests of the configuration and the integration tests that run an embedded worker on it."""

from collections.abc import Mapping
from typing import Any

from celeryconfig import celery_settings
from tasks.settings import load_settings


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    """celeryconfig.py's settings as a process with exactly these KRONOS_* variables would load them."""
    return celery_settings(load_settings({name: value for name, value in env.items() if name.startswith("KRONOS_")}))
