"""TLS and Redis password settings (issue #7) and the ssl options every connection gets from them; no server
(tests/integration/test_security_tls.py runs them against a TLS-only redis-server and a real worker)."""

import ssl
from pathlib import Path

import pytest
import redis
from celery import Celery

from celeryconfig import celery_settings
from tasks.connections import ssl_options
from tasks.settings import SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Every character that means something in a URL, so that a quoting slip anywhere would break the login.
PASSWORD = "p@ss:w/rd%41#?&=+ x"


@pytest.fixture
def pem(tmp_path: Path) -> str:
    """A readable file standing in for a certificate, key or CA (settings only check that they can be read)."""
    path = tmp_path / "any.pem"
    path.write_text("not parsed by the settings\n")
    return str(path)


def secret_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "redis-password"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "tls_variables",
    [["KRONOS_REDIS_TLS_CA_FILE"], ["KRONOS_REDIS_TLS_CERT_FILE", "KRONOS_REDIS_TLS_KEY_FILE"]],
)
def test_tls_files_with_a_plain_redis_url_are_refused(pem: str, tls_variables: list[str]) -> None:
    environ = {"KRONOS_BROKER_URL": "redis://redis:6379/0", **dict.fromkeys(tls_variables, pem)}
    with pytest.raises(SettingsError, match="not rediss://"):
        load_settings(environ)


def test_tls_files_need_both_urls_to_be_rediss(pem: str) -> None:
    environ = {
        "KRONOS_BROKER_URL": "rediss://redis:6380/0",
        "KRONOS_RESULT_BACKEND": "redis://redis:6379/1",
        "KRONOS_REDIS_TLS_CA_FILE": pem,
    }
    with pytest.raises(SettingsError, match="not rediss://"):
        load_settings(environ)


@pytest.mark.parametrize("given", ["KRONOS_REDIS_TLS_CERT_FILE", "KRONOS_REDIS_TLS_KEY_FILE"])
def test_client_certificate_and_key_go_together(pem: str, given: str) -> None:
    with pytest.raises(SettingsError, match="set both or neither"):
        load_settings({"KRONOS_BROKER_URL": "rediss://redis:6380/0", given: pem})


@pytest.mark.parametrize(
    "variable",
    [
        "KRONOS_REDIS_TLS_CA_FILE",
        "KRONOS_REDIS_TLS_CERT_FILE",
        "KRONOS_REDIS_TLS_KEY_FILE",
        "KRONOS_REDIS_PASSWORD_FILE",
    ],
)
def test_an_unreadable_file_is_an_error_naming_its_variable(tmp_path: Path, variable: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{variable}: cannot read"):
        load_settings({"KRONOS_BROKER_URL": "rediss://redis:6380/0", variable: str(tmp_path / "missing.pem")})


def test_the_password_file_goes_into_both_urls_quoted(tmp_path: Path) -> None:
    environ = {
        "KRONOS_BROKER_URL": "rediss://kronos%40team@redis.internal:6380/0",  # user kronos@team
        "KRONOS_RESULT_BACKEND": "rediss://redis.internal/2",
        # A secret mounted by Docker or Kubernetes: the first line counts, its newline does not.
        "KRONOS_REDIS_PASSWORD_FILE": secret_file(tmp_path, f"{PASSWORD}\nsecond line ignored\n"),
    }
    settings = load_settings(environ)
    broker = redis.ConnectionPool.from_url(settings.broker_url).connection_kwargs
    backend = redis.ConnectionPool.from_url(settings.result_backend).connection_kwargs
    assert (broker["username"], broker["password"], broker["host"], broker["port"], broker["db"]) == (
        "kronos@team", PASSWORD, "redis.internal", 6380, 0,
    )  # fmt: skip
    # A URL without a user authenticates as Redis's `default` user, which is what requirepass sets.
    assert (backend["username"], backend["password"], backend["db"]) == ("default", PASSWORD, 2)
    assert PASSWORD not in repr(settings)


def test_a_password_in_the_url_and_in_a_file_is_refused(tmp_path: Path) -> None:
    environ = {
        "KRONOS_BROKER_URL": "redis://:inline@redis:6379/0",
        "KRONOS_REDIS_PASSWORD_FILE": secret_file(tmp_path, "from-file\n"),
    }
    with pytest.raises(SettingsError, match=r"^KRONOS_BROKER_URL carries a password") as raised:
        load_settings(environ)
    assert "inline" not in str(raised.value) and "from-file" not in str(raised.value)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^KRONOS_REDIS_PASSWORD_FILE: .* is empty"):
        load_settings({"KRONOS_REDIS_PASSWORD_FILE": secret_file(tmp_path, "\n  \n")})


def test_ssl_options_are_none_for_plain_redis() -> None:
    settings = load_settings({"KRONOS_BROKER_URL": "redis://redis:6379/0"})
    assert ssl_options(settings) is None
    assert ssl_options(settings, settings.result_backend) is None


def test_ssl_options_always_verify_the_server() -> None:
    # No CA file: the system's trusted CAs, never kombu's default for rediss:// of accepting any certificate.
    settings = load_settings({"KRONOS_BROKER_URL": "rediss://redis:6380/0"})
    assert ssl_options(settings) == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}


def test_ssl_options_carry_the_given_files_and_follow_each_url(pem: str, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("")
    environ = {
        "KRONOS_BROKER_URL": "rediss://redis:6380/0",
        "KRONOS_REDIS_TLS_CA_FILE": pem,
        "KRONOS_REDIS_TLS_CERT_FILE": pem,
        "KRONOS_REDIS_TLS_KEY_FILE": str(key),
    }
    settings = load_settings(environ)
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": pem,
        "ssl_certfile": pem,
        "ssl_keyfile": str(key),
    }
    assert ssl_options(settings) == ssl_options(settings, settings.result_backend) == expected
    assert ssl_options(settings, "redis://elsewhere:6379/0") is None


def test_celery_connections_get_the_tls_options(pem: str) -> None:
    # What every process loads: kombu's broker connection and Celery's Redis backend, built from celeryconfig.
    config = celery_settings(
        load_settings({"KRONOS_BROKER_URL": "rediss://redis:6380/0", "KRONOS_REDIS_TLS_CA_FILE": pem})
    )
    app = Celery("kronos-tls-config-test", set_as_current=False)
    app.config_from_object(config)
    broker_ssl = app.connection_for_write().ssl
    backend = app.backend.connparams
    assert broker_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": pem}
    assert issubclass(backend["connection_class"], redis.SSLConnection)
    assert (backend["ssl_cert_reqs"], backend["ssl_ca_certs"], backend["db"]) == (ssl.CERT_REQUIRED, pem, 1)
