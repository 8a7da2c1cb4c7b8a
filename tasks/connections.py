"""Connections to Redis with the deployment's TLS and Sentinel settings (torch-free: producers import this).

Every Redis connection the project opens goes through here or through Celery configured from here
(celeryconfig.py), so a rediss:// URL always means a verified server and, when KRONOS_REDIS_TLS_CERT_FILE
and KRONOS_REDIS_TLS_KEY_FILE are set, a client certificate. Left to itself, kombu treats a rediss:// URL
without options as "encrypt but trust any certificate".

Sentinel. With sentinel:// URLs (KRONOS_SENTINEL_MASTER naming the master) a client asks the sentinels where
the master is, and asks again when a connection to it fails or meets a read-only replica (redis-py turns
READONLY on a master connection into a ConnectionError): after a failover every client reaches the new master
on its next command. Celery and kombu are given the same through their transport options.
"""

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from tasks.settings import SENTINEL_SEPARATOR, KronosSettings, is_sentinel_url

SENTINEL_PORT = 26379


def ssl_options(settings: KronosSettings, url: str | None = None) -> dict[str, Any] | None:
    """TLS options for a connection to `url` (default: the broker), or None when it is a plain redis:// URL
    (or a sentinel:// one without KRONOS_SENTINEL_TLS).

    The keys are the ones redis-py's SSLConnection, kombu's Redis transport (`broker_use_ssl`) and Celery's
    Redis result backend (`redis_backend_use_ssl`) all take. Without KRONOS_REDIS_TLS_CA_FILE the server's
    certificate is checked against the system's trusted CAs.
    """
    scheme = urlsplit(url or settings.broker_url).scheme
    if scheme != "rediss" and not (is_sentinel_url(url or settings.broker_url) and settings.sentinel_tls):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    files = {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    options.update({key: path for key, path in files.items() if path})
    return options


def redis_client(url: str, settings: KronosSettings, **kwargs: Any) -> redis.Redis:
    """A redis-py client on `url` with the deployment's TLS options, or on the master the sentinels name for
    a sentinel:// URL; `kwargs` go to redis.Redis.from_url (the master's connections for Sentinel)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **(ssl_options(settings, url) or {}), **kwargs)
    parts = [urlsplit(part) for part in url.split(SENTINEL_SEPARATOR)]
    first = parts[0]
    tls = ssl_options(settings, url)
    master = {
        "db": int(first.path.strip("/") or 0),
        "username": unquote(first.username) if first.username else None,
        "password": unquote(first.password) if first.password else None,
        **({"ssl": True, **tls} if tls else {}),  # redis-py's Sentinel pool takes `ssl` for its connection class
        **kwargs,
    }
    sentinels = Sentinel(
        [(part.hostname, part.port or SENTINEL_PORT) for part in parts],
        sentinel_kwargs=sentinel_kwargs(settings, kwargs),
    )
    return sentinels.master_for(settings.sentinel_master, **master)


def sentinel_kwargs(settings: KronosSettings, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """How to talk to the sentinels themselves: their password, TLS as to the servers, and the socket timeouts
    of the master's."""
    timeouts = {"socket_timeout": settings.socket_timeout, "socket_connect_timeout": settings.socket_connect_timeout}
    timeouts.update({key: value for key, value in (kwargs or {}).items() if key in timeouts})
    tls = ssl_options(settings, settings.broker_url)
    return {
        **timeouts,
        **({"password": settings.sentinel_password} if settings.sentinel_password else {}),
        **({"ssl": True, **tls} if tls else {}),
    }


def sentinel_transport_options(settings: KronosSettings) -> dict[str, Any]:
    """What kombu's Sentinel channel and Celery's Sentinel result backend need on top of their usual options
    (nothing for redis:// URLs)."""
    if not settings.uses_sentinel:
        return {}
    return {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs(settings)}
