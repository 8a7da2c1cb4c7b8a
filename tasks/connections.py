"""Connections to Redis with the deployment's TLS settings (torch-free: producers import this).

Every Redis connection the project opens goes through here or through Celery configured from here
(celeryconfig.py), so a rediss:// URL always means a verified server and, when KRONOS_REDIS_TLS_CERT_FILE
and KRONOS_REDIS_TLS_KEY_FILE are set, a client certificate. Left to itself, kombu treats a rediss:// URL
without options as "encrypt but trust any certificate".
"""

import ssl
from typing import Any
from urllib.parse import urlsplit

import redis

from tasks.settings import KronosSettings


def ssl_options(settings: KronosSettings, url: str | None = None) -> dict[str, Any] | None:
    """TLS options for a connection to `url` (default: the broker), or None when it is a plain redis:// URL.

    The keys are the ones redis-py's SSLConnection, kombu's Redis transport (`broker_use_ssl`) and Celery's
    Redis result backend (`redis_backend_use_ssl`) all take. Without KRONOS_REDIS_TLS_CA_FILE the server's
    certificate is checked against the system's trusted CAs.
    """
    if urlsplit(url or settings.broker_url).scheme != "rediss":
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
    """A redis-py client on `url` with the deployment's TLS options; `kwargs` go to redis.Redis.from_url."""
    return redis.Redis.from_url(url, **(ssl_options(settings, url) or {}), **kwargs)
