"""Deployment settings, read from KRONOS_* environment variables.

Every variable is documented in docs/CONFIGURATION.md (tests/test_celery_config.py keeps the two in step).
An unset or blank variable takes its default; an invalid one raises SettingsError naming it.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
RESULT_BACKEND_DB = 1
DEFAULT_MODELS = ("kronos-small", "kronos-base", "kronos-mini")
# Added to twice the longest job in the default visibility timeout: covers clock skew between the host
# that fetched a message (its clock scores the unacked entry) and the host whose sweep compares against it.
VISIBILITY_MARGIN_SECONDS = 60

# Names end up in Redis keys and in `celery worker -Q` lists: keep them free of separators and spaces.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Our transport options (visibility timeout, priority steps, socket timeouts) are kombu-Redis specific.
_REDIS_SCHEMES = ("redis", "rediss")


class SettingsError(ValueError):
    """A KRONOS_* variable holds an unusable value; the message names the variable."""


@dataclass(frozen=True)
class KronosSettings:
    broker_url: str
    result_backend: str
    result_expires: int
    max_job_seconds: int
    visibility_timeout: int
    prefetch_multiplier: int
    queue_prefix: str
    models: tuple[str, ...]
    default_model: str
    unacked_restore_interval: int
    socket_timeout: float
    socket_connect_timeout: float
    health_check_interval: int


def load_settings(environ: Mapping[str, str] = os.environ) -> KronosSettings:
    """Read and validate every KRONOS_* variable; raise SettingsError on the first bad one."""
    broker_url = env_redis_url(environ, "KRONOS_BROKER_URL", DEFAULT_BROKER_URL)
    max_job_seconds = env_whole_seconds(environ, "KRONOS_MAX_JOB_SECONDS", 600)
    visibility_timeout = env_whole_seconds(
        environ, "KRONOS_VISIBILITY_TIMEOUT", 2 * max_job_seconds + VISIBILITY_MARGIN_SECONDS
    )
    if visibility_timeout < max_job_seconds:
        raise SettingsError(
            f"KRONOS_VISIBILITY_TIMEOUT ({visibility_timeout}) must be >= KRONOS_MAX_JOB_SECONDS "
            f"({max_job_seconds}): a job still unacknowledged when it expires is delivered to a second worker"
        )
    models = env_names(environ, "KRONOS_MODELS", DEFAULT_MODELS)
    default_model = env_name(environ, "KRONOS_DEFAULT_MODEL", "kronos-small")
    if default_model not in models:
        raise SettingsError(f"KRONOS_DEFAULT_MODEL {default_model!r} is not one of KRONOS_MODELS ({', '.join(models)})")
    return KronosSettings(
        broker_url=broker_url,
        result_backend=env_redis_url(environ, "KRONOS_RESULT_BACKEND", _with_db(broker_url, RESULT_BACKEND_DB)),
        result_expires=env_whole_seconds(environ, "KRONOS_RESULT_EXPIRES", 86400),
        max_job_seconds=max_job_seconds,
        visibility_timeout=visibility_timeout,
        prefetch_multiplier=env_whole_number(environ, "KRONOS_PREFETCH_MULTIPLIER", 1),
        queue_prefix=env_name(environ, "KRONOS_QUEUE_PREFIX", "kronos"),
        models=models,
        default_model=default_model,
        unacked_restore_interval=env_whole_seconds(environ, "KRONOS_UNACKED_RESTORE_INTERVAL", 10),
        socket_timeout=env_positive_seconds(environ, "KRONOS_SOCKET_TIMEOUT", 30.0),
        socket_connect_timeout=env_positive_seconds(environ, "KRONOS_SOCKET_CONNECT_TIMEOUT", 5.0),
        health_check_interval=env_whole_seconds(environ, "KRONOS_HEALTH_CHECK_INTERVAL", 25),
    )


@cache
def current_settings() -> KronosSettings:
    """This process's settings, read once so that every module sees the same values."""
    return load_settings()


def env_raw(environ: Mapping[str, str], variable: str) -> str | None:
    # Blank counts as unset: compose files and Helm charts often pass "" for "not configured".
    value = environ.get(variable, "").strip()
    return value or None


def env_whole_number(environ: Mapping[str, str], variable: str, default: int, *, unit: str = "") -> int:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise SettingsError(f"{variable} must be a whole number{unit} >= 1, got {raw!r}")
    return int(raw)


def env_whole_seconds(environ: Mapping[str, str], variable: str, default: int) -> int:
    return env_whole_number(environ, variable, default, unit=" of seconds")


def env_positive_seconds(environ: Mapping[str, str], variable: str, default: float) -> float:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise SettingsError(f"{variable} must be a number of seconds > 0, got {raw!r}")
    return seconds


def env_name(environ: Mapping[str, str], variable: str, default: str) -> str:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    if not _NAME_PATTERN.fullmatch(raw):
        raise SettingsError(f"{variable} must match {_NAME_PATTERN.pattern}, got {raw!r}")
    return raw


def env_names(environ: Mapping[str, str], variable: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    names = tuple(item.strip() for item in raw.split(","))
    bad = [name for name in names if not _NAME_PATTERN.fullmatch(name)]
    if bad:
        raise SettingsError(
            f"{variable} must be a comma-separated list of names matching {_NAME_PATTERN.pattern}, got {raw!r}"
        )
    if len(set(names)) != len(names):
        raise SettingsError(f"{variable} lists a model twice: {raw!r}")
    return names


def env_redis_url(environ: Mapping[str, str], variable: str, default: str) -> str:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    scheme = urlsplit(raw).scheme
    # Only the scheme goes into the message: the rest of the URL may carry a password.
    if scheme not in _REDIS_SCHEMES:
        raise SettingsError(
            f"{variable} must be a {' or '.join(s + '://' for s in _REDIS_SCHEMES)} URL, got scheme {scheme!r}"
        )
    return raw


def _with_db(redis_url: str, db: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{db}"))
