"""TLS to Redis with client certificates, and the Redis password read from a file (issue #7).

The integration tests run one redis-server that speaks TLS only, demands a client certificate signed by the
test's own CA and a password, and one real worker; the producer and the worker are given the password only
through KRONOS_REDIS_PASSWORD_FILE. The settings and ssl_options tests need no server.
"""

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kronos_cases as kc
import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_server import RedisServer, TlsUnsupported
from tls_certs import CertificateError, TlsFiles, make_tls_files
from worker_process import REPO_ROOT, worker_env

from celeryconfig import celery_settings
from schemas import ForecastResult
from tasks.connections import redis_client, ssl_options
from tasks.settings import KronosSettings, SettingsError, load_settings

# Every character that means something in a URL, so that a quoting slip anywhere would break the login.
PASSWORD = "p@ss:w/rd%41#?&=+ x"
NO_RETRY = Retry(NoBackoff(), 0)  # a refused connection should fail the test at once, not after redis-py's retries


# --- settings and ssl_options, no server -------------------------------------------------------------


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


# --- a real redis-server with TLS, a real worker -------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    try:
        return make_tls_files(tmp_path_factory.mktemp("tls"))
    except CertificateError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("secrets") / "redis-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def server(tls_files: TlsFiles) -> Iterator[RedisServer]:
    """This module's Redis: TLS only, client certificates required, and a password."""
    try:
        redis_server = RedisServer(tls=tls_files, extra_args=["--requirepass", PASSWORD])
    except TlsUnsupported as exc:
        pytest.skip(str(exc))
    with redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def tls_environment(server: RedisServer, tls_files: TlsFiles, password_file: str) -> dict[str, str]:
    """What a deployment sets: rediss:// URLs without the password, the certificates and the password file."""
    return {
        "KRONOS_BROKER_URL": server.tls_url(0),
        "KRONOS_RESULT_BACKEND": server.tls_url(1),
        "KRONOS_REDIS_TLS_CA_FILE": str(tls_files.ca),
        "KRONOS_REDIS_TLS_CERT_FILE": str(tls_files.client_cert),
        "KRONOS_REDIS_TLS_KEY_FILE": str(tls_files.client_key),
        "KRONOS_REDIS_PASSWORD_FILE": password_file,
    }


@pytest.fixture(scope="module")
def env(tls_environment: dict[str, str]) -> dict[str, str]:
    """The worker's (and producer subprocesses') environment; conftest's `worker` fixture runs it."""
    return worker_env(dict(os.environ), PYTHONPATH=str(REPO_ROOT), **tls_environment)


@pytest.fixture(scope="module")
def client(tls_environment: dict[str, str]):
    """The Python producer given the rediss:// URLs, in a process that loaded celeryconfig from its own
    environment first (as tasks.app does on import), not from the TLS one the client is built with."""
    import celeryconfig  # noqa: F401  (this process's own configuration, before the client's environment is set)
    from tasks.client import KronosClient

    with pytest.MonkeyPatch.context() as patch:
        for name, value in tls_environment.items():
            patch.setenv(name, value)
        with KronosClient(tls_environment["KRONOS_BROKER_URL"], tls_environment["KRONOS_RESULT_BACKEND"]) as kronos:
            yield kronos


def tls_settings(tls_environment: dict[str, str], **changes: str | None) -> KronosSettings:
    """The deployment's settings with some variables changed (None: unset)."""
    environ = {name: value for name, value in {**tls_environment, **changes}.items() if value is not None}
    return load_settings(environ)


def run_command(env: dict[str, str], *arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, *arguments], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, f"{arguments}: {completed.stdout}{completed.stderr}"
    assert PASSWORD not in completed.stdout + completed.stderr
    return completed.stdout


@pytest.mark.integration
def test_a_producer_submits_and_reads_its_result_over_tls(worker, env, tmp_path: Path) -> None:
    """A producer process configured by the environment alone, as in a container: the command-line client."""
    csv = tmp_path / "tls-cli.csv"
    kc.candles().iloc[100:164].to_csv(csv, index=False)
    output = run_command(env, "-m", "tasks.cli", "submit", str(csv), "--pred-len", "4", "--wait", "--json")
    result = ForecastResult.model_validate(json.loads(output)["result"])
    assert (result.series_id, len(result.timestamps)) == ("tls-cli", 4)
    # The worker's heartbeat (its own redis-py client) arrives over TLS, and the container's HEALTHCHECK reads it.
    assert run_command(env, "-m", "worker.health").startswith("ok:")
    # kombu warns, then trusts any certificate, when a rediss:// URL comes without options.
    assert "insecure SSL" not in worker.log()


@pytest.mark.integration
def test_a_client_given_rediss_urls_submits_and_reads_over_tls(worker, client) -> None:
    job = client.submit(kc.candles().iloc[:64], series_id="tls-0", pred_len=8, sample_count=2, seed=7)
    result = job.wait(timeout=60)
    assert (result.series_id, len(result.timestamps)) == ("tls-0", 8)
    [heartbeat] = client.workers()
    assert heartbeat.ready


@pytest.mark.integration
def test_a_client_without_a_client_certificate_is_refused(server, tls_environment) -> None:
    settings = tls_settings(tls_environment, KRONOS_REDIS_TLS_CERT_FILE=None, KRONOS_REDIS_TLS_KEY_FILE=None)
    with (
        redis_client(settings.broker_url, settings, retry=NO_RETRY) as no_certificate,
        pytest.raises(redis.ConnectionError),
    ):
        no_certificate.ping()


@pytest.mark.integration
def test_the_server_certificate_is_verified(server, tls_environment) -> None:
    # Without the test CA the server's certificate chains to nothing the system trusts.
    settings = tls_settings(tls_environment, KRONOS_REDIS_TLS_CA_FILE=None)
    with (
        redis_client(settings.broker_url, settings, retry=NO_RETRY) as unverified,
        pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        unverified.ping()


@pytest.mark.integration
def test_a_plaintext_connection_to_the_tls_port_fails(server) -> None:
    with (
        server.client(ssl=False, password=PASSWORD, socket_timeout=5, retry=NO_RETRY) as plaintext,
        pytest.raises(redis.ConnectionError),
    ):
        plaintext.ping()


@pytest.mark.integration
def test_the_password_comes_from_the_file_and_is_required(server, tls_environment) -> None:
    assert PASSWORD not in tls_environment["KRONOS_BROKER_URL"] + tls_environment["KRONOS_RESULT_BACKEND"]
    settings = tls_settings(tls_environment)
    with redis_client(settings.broker_url, settings, retry=NO_RETRY) as with_password:
        assert with_password.ping()
    without_file = tls_settings(tls_environment, KRONOS_REDIS_PASSWORD_FILE=None)
    with (
        redis_client(without_file.broker_url, without_file, retry=NO_RETRY) as without_password,
        pytest.raises(redis.AuthenticationError),
    ):
        without_password.ping()
