"""celeryconfig.py's settings as a process started with a given set of KRONOS_* variables loads them; shared by
the unit tests of the configuration and the integration tests that run an embedded worker on it."""

import os
import runpy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tasks.settings import current_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def celery_config(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> dict[str, Any]:
    """celeryconfig.py's settings as a process with exactly these KRONOS_* variables would load them."""
    for name in [name for name in os.environ if name.startswith("KRONOS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("KRONOS_"):
            monkeypatch.setenv(name, value)
    current_settings.cache_clear()
    try:
        namespace = runpy.run_path(str(REPO_ROOT / "celeryconfig.py"))
    finally:
        current_settings.cache_clear()
    # Imported names (functions, classes) are not settings.
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and not callable(value) and type(value).__name__ != "module"
    }
