"""TLS to Redis with client certificates, and the Redis password read from a file (issue #7).

The integration tests run one redis-server that speaks TLS only, demands a client certificate signed by the
test's own CA and a password, and one real worker; the producer and the worker are given the password only
through KRONOS_REDIS_PASSWORD_FILE. The settings and ssl_options tests, which need no server, are
tests/unit/test_tls_settings.py.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kronos_cases as kc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_server import RedisServer, TlsUnsupported
from tls_certs import CertificateError, TlsFiles, make_tls_files
from worker_process import REPO_ROOT, worker_env

from schemas import ForecastResult
from tasks.connections import redis_client
from tasks.settings import KronosSettings, load_settings

# Every character that means something in a URL, so that a quoting slip anywhere would break the login.
PASSWORD = "p@ss:w/rd%41#?&=+ x"
NO_RETRY = Retry(NoBackoff(), 0)  # a refused connection should fail the test at once, not after redis-py's retries


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


def test_a_client_given_rediss_urls_submits_and_reads_over_tls(worker, client) -> None:
    job = client.submit(kc.candles().iloc[:64], series_id="tls-0", pred_len=8, sample_count=2, seed=7)
    result = job.wait(timeout=60)
    assert (result.series_id, len(result.timestamps)) == ("tls-0", 8)
    [heartbeat] = client.workers()
    assert heartbeat.ready


def test_a_client_without_a_client_certificate_is_refused(server, tls_environment) -> None:
    settings = tls_settings(tls_environment, KRONOS_REDIS_TLS_CERT_FILE=None, KRONOS_REDIS_TLS_KEY_FILE=None)
    with (
        redis_client(settings.broker_url, settings, retry=NO_RETRY) as no_certificate,
        pytest.raises(redis.ConnectionError),
    ):
        no_certificate.ping()


def test_the_server_certificate_is_verified(server, tls_environment) -> None:
    # Without the test CA the server's certificate chains to nothing the system trusts.
    settings = tls_settings(tls_environment, KRONOS_REDIS_TLS_CA_FILE=None)
    with (
        redis_client(settings.broker_url, settings, retry=NO_RETRY) as unverified,
        pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        unverified.ping()


def test_a_plaintext_connection_to_the_tls_port_fails(server) -> None:
    with (
        server.client(ssl=False, password=PASSWORD, socket_timeout=5, retry=NO_RETRY) as plaintext,
        pytest.raises(redis.ConnectionError),
    ):
        plaintext.ping()


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
