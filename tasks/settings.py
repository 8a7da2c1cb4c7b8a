"""Deployment settings, read from KRONOS_* environment variables.

Every variable is documented in docs/CONFIGURATION.md (tests/unit/test_celery_config.py keeps the two in step).
An unset or blank variable takes its default; an invalid one raises SettingsError naming it.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
RESULT_BACKEND_DB = 1
DEFAULT_MODELS = ("kronos-small", "kronos-base", "kronos-mini")
# Added to twice the longest job in the default visibility timeout: covers clock skew between the host
# that fetched a message (its clock scores the unacked entry) and the host whose sweep compares against it.
VISIBILITY_MARGIN_SECONDS = 60

# Names end up in Redis keys and in `celery worker -Q` lists: keep them free of separators and spaces.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A producer name is also its Redis ACL user and the prefix of its job ids ("<producer>:<id>"): no dots,
# so that one producer's key patterns can never match another's ("a" vs "a.b").
PRODUCER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Our transport options (visibility timeout, priority steps, socket timeouts) are kombu-Redis specific.
# sentinel:// is Celery's and kombu's form for Redis Sentinel: "sentinel://host:26379/0;sentinel://host2:26379/0",
# one URL per sentinel, the master's name in KRONOS_SENTINEL_MASTER (tasks/connections.py).
_REDIS_SCHEMES = ("redis", "rediss", "sentinel")
SENTINEL_SCHEME = "sentinel"
SENTINEL_SEPARATOR = ";"


class SettingsError(ValueError):
    """A KRONOS_* variable holds an unusable value; the message names the variable."""


@dataclass(frozen=True)
class KronosSettings:
    # repr=False: the URLs may carry a password
    broker_url: str = field(repr=False)
    result_backend: str = field(repr=False)
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
    producer: str | None = None  # who this process enqueues as (KRONOS_PRODUCER); None: the shared queues
    producers: tuple[str, ...] = ()  # the producers a worker serves (KRONOS_PRODUCERS); (): the shared queues
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Redis Sentinel: the monitored master's name, and the sentinels' own password (None: they need none)
    sentinel_master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool = False  # TLS to the sentinels and to the servers they name
    # Writes that must survive a failover (a job accepted, an answer stored) wait for this many replicas
    replicas_to_ack: int = 0
    replica_ack_timeout: float = 2.0

    @property
    def uses_sentinel(self) -> bool:
        return is_sentinel_url(self.broker_url)


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
    result_backend = env_redis_url(environ, "KRONOS_RESULT_BACKEND", _with_db(broker_url, RESULT_BACKEND_DB))
    password = env_secret_file(environ, "KRONOS_REDIS_PASSWORD_FILE")
    if password is not None:
        broker_url = _with_password(broker_url, password, "KRONOS_BROKER_URL")
        result_backend = _with_password(result_backend, password, "KRONOS_RESULT_BACKEND")
    tls_files = {
        name: env_readable_file(environ, f"KRONOS_REDIS_TLS_{name.upper()}_FILE") for name in ("ca", "cert", "key")
    }
    sentinel_tls = env_flag(environ, "KRONOS_SENTINEL_TLS")
    if sentinel_tls and not is_sentinel_url(broker_url):
        raise SettingsError("KRONOS_SENTINEL_TLS=1 needs sentinel:// URLs; with one Redis use rediss:// URLs")
    tls_urls = sentinel_tls or (_is_tls(broker_url) and _is_tls(result_backend))
    if any(tls_files.values()) and not tls_urls:
        raise SettingsError(
            "KRONOS_REDIS_TLS_*_FILE are set but KRONOS_BROKER_URL/KRONOS_RESULT_BACKEND are not rediss:// URLs "
            "(nor sentinel:// URLs with KRONOS_SENTINEL_TLS=1): the certificates would be ignored and the "
            "connection would not be encrypted"
        )
    if bool(tls_files["cert"]) != bool(tls_files["key"]):
        raise SettingsError("KRONOS_REDIS_TLS_CERT_FILE and KRONOS_REDIS_TLS_KEY_FILE go together: set both or neither")
    sentinel_master = env_name(environ, "KRONOS_SENTINEL_MASTER", "") or None
    if is_sentinel_url(broker_url) != is_sentinel_url(result_backend):
        raise SettingsError(
            "KRONOS_BROKER_URL and KRONOS_RESULT_BACKEND must both be sentinel:// URLs or both redis(s):// URLs"
        )
    if is_sentinel_url(broker_url) and sentinel_master is None:
        raise SettingsError("KRONOS_SENTINEL_MASTER must name the master the sentinels monitor (sentinel:// URLs)")
    return KronosSettings(
        broker_url=broker_url,
        result_backend=result_backend,
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
        producer=env_producer(environ, "KRONOS_PRODUCER"),
        producers=env_producers(environ, "KRONOS_PRODUCERS"),
        tls_ca_file=tls_files["ca"],
        tls_cert_file=tls_files["cert"],
        tls_key_file=tls_files["key"],
        sentinel_master=sentinel_master,
        sentinel_tls=sentinel_tls,
        sentinel_password=env_secret_file(environ, "KRONOS_SENTINEL_PASSWORD_FILE"),
        replicas_to_ack=env_count(environ, "KRONOS_REPLICAS_TO_ACK", 0),
        replica_ack_timeout=env_positive_seconds(environ, "KRONOS_REPLICA_ACK_TIMEOUT", 2.0),
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


def env_flag(environ: Mapping[str, str], variable: str) -> bool:
    raw = env_raw(environ, variable)
    if raw not in (None, "0", "1"):
        raise SettingsError(f"{variable} must be 1 (on) or 0 (off), got {raw!r}")
    return raw == "1"


def env_count(environ: Mapping[str, str], variable: str, default: int) -> int:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise SettingsError(f"{variable} must be a whole number >= 0, got {raw!r}")
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


def env_producer(environ: Mapping[str, str], variable: str) -> str | None:
    raw = env_raw(environ, variable)
    if raw is not None and not PRODUCER_PATTERN.fullmatch(raw):
        raise SettingsError(f"{variable} must match {PRODUCER_PATTERN.pattern} (no dots), got {raw!r}")
    return raw


def env_producers(environ: Mapping[str, str], variable: str) -> tuple[str, ...]:
    raw = env_raw(environ, variable)
    if raw is None:
        return ()
    names = tuple(item.strip() for item in raw.split(","))
    bad = [name for name in names if not PRODUCER_PATTERN.fullmatch(name)]
    if bad:
        raise SettingsError(f"{variable}: {', '.join(map(repr, bad))} must match {PRODUCER_PATTERN.pattern} (no dots)")
    if len(set(names)) != len(names):
        raise SettingsError(f"{variable} lists a producer twice: {raw!r}")
    return names


def env_readable_file(environ: Mapping[str, str], variable: str) -> str | None:
    raw = env_raw(environ, variable)
    if raw is not None and not os.access(raw, os.R_OK):
        raise SettingsError(f"{variable}: cannot read {raw!r}")
    return raw


def env_secret_file(environ: Mapping[str, str], variable: str) -> str | None:
    """The first line of the file a variable names (a Docker or Kubernetes secret), never the value itself."""
    path = env_readable_file(environ, variable)
    if path is None:
        return None
    lines = Path(path).read_text().strip().splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise SettingsError(f"{variable}: {path!r} is empty")
    return secret


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
    if scheme == SENTINEL_SCHEME:
        parts = raw.split(SENTINEL_SEPARATOR)
        if any(urlsplit(part).scheme != SENTINEL_SCHEME or not urlsplit(part).hostname for part in parts):
            raise SettingsError(f"{variable}: every part of a Sentinel URL is sentinel://host:port[/db], ';'-separated")
    return raw


def is_sentinel_url(redis_url: str) -> bool:
    return urlsplit(redis_url).scheme == SENTINEL_SCHEME


def _each_url(redis_url: str, change) -> str:
    """`change` applied to each sentinel of a sentinel:// URL list, or to the one URL."""
    if not is_sentinel_url(redis_url):
        return change(redis_url)
    return SENTINEL_SEPARATOR.join(change(part) for part in redis_url.split(SENTINEL_SEPARATOR))


def _is_tls(redis_url: str) -> bool:
    return urlsplit(redis_url).scheme == "rediss"


def _with_password(redis_url: str, password: str, variable: str) -> str:
    return _each_url(redis_url, lambda url: _one_with_password(url, password, variable))


def _one_with_password(redis_url: str, password: str, variable: str) -> str:
    parts = urlsplit(redis_url)
    if parts.password:
        raise SettingsError(f"{variable} carries a password and KRONOS_REDIS_PASSWORD_FILE is set: keep one")
    # urlsplit leaves the user as written, percent-escapes included: unescape before quoting it again.
    user = quote(unquote(parts.username or "default"), safe="")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _with_db(redis_url: str, db: int) -> str:
    return _each_url(redis_url, lambda url: urlunsplit(urlsplit(url)._replace(path=f"/{db}")))
