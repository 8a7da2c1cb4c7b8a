"""A Redis Sentinel deployment for tests: one master, one replica and three sentinels, each a real process on
its own loopback port (the same redis-server binary: `redis-server CONF --sentinel`), stopped and deleted as a
context manager, whatever fails."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis_server import HOST, RedisServer, RedisServerError, find_redis_server, find_tls_redis_server, free_port
from tls_certs import TlsFiles

MASTER_NAME = "kronos"


class SentinelProcess:
    def __init__(self, master_port: int, *, down_after_ms: int, failover_timeout_ms: int,
                 auth: tuple[str, str] | None = None, password: str | None = None,
                 executable: str | None = None, tls: TlsFiles | None = None):  # fmt: skip
        self.port = free_port()
        self.tls = tls
        self.directory = Path(tempfile.mkdtemp(prefix="kronos-sentinel-"))
        self.config = self.directory / "sentinel.conf"
        # Sentinel rewrites its own file as it learns the deployment: it must be a writable file of its own.
        listen = f"port {self.port}\n"
        if tls is not None:  # TLS only, to clients, to the other sentinels and to the servers
            listen = (f"port 0\ntls-port {self.port}\ntls-cert-file {tls.server_cert}\ntls-key-file {tls.server_key}\n"
                      f"tls-ca-cert-file {tls.ca}\ntls-auth-clients yes\ntls-replication yes\n"
                      f"tls-client-cert-file {tls.client_cert}\ntls-client-key-file {tls.client_key}\n")  # fmt: skip
        self.config.write_text(
            f"{listen}bind {HOST}\ndir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} {HOST} {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        with self.config.open("a") as config:
            if auth is not None:  # how this sentinel authenticates to the servers (an ACL user of theirs)
                config.write(
                    f"sentinel auth-user {MASTER_NAME} {auth[0]}\nsentinel auth-pass {MASTER_NAME} {auth[1]}\n"
                )
            if password is not None:  # what clients (and the other sentinels) must send to this one
                config.write(f"requirepass {password}\nsentinel sentinel-pass {password}\n")
        self.password = password
        self.executable = executable or find_redis_server()
        self.process: subprocess.Popen | None = None

    def start(self) -> "SentinelProcess":
        command = [self.executable, str(self.config), "--sentinel"]
        with open(self.directory / "sentinel.log", "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                    return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RedisServerError(f"sentinel on {self.port} did not start\n{self.log_tail()}") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        tls = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.client_cert),
                   "ssl_keyfile": str(self.tls.client_key)}  # fmt: skip
        return redis.Redis(HOST, self.port, password=self.password, socket_timeout=5, decode_responses=True, **tls)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.directory / "sentinel.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sentinel log)"

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


class SentinelCluster:
    """Use as a context manager. `url(db)` is the sentinel:// URL list clients are given; `master()` the server
    the sentinels currently name; `failover()` a planned switch, `kill_master()` an unplanned one."""

    def __init__(self, *, sentinels: int = 3, down_after_ms: int = 1000, failover_timeout_ms: int = 2000,
                 extra_args: tuple[str, ...] = (), admin: tuple[str, str] | None = None,
                 sentinel_auth: tuple[str, str] | None = None, sentinel_password: str | None = None,
                 executable: str | None = None, tls: TlsFiles | None = None):  # fmt: skip
        """`extra_args` go to every server (an ACL file, a replica's masteruser and masterauth); `admin` is the
        (user, password) this harness reads the servers as; `sentinel_auth` the servers' user the sentinels
        log in as, `sentinel_password` the sentinels' own password."""
        self.extra_args = list(extra_args)
        self.admin = dict(zip(("username", "password"), admin, strict=True)) if admin else {}
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelProcess] = []
        self._sentinel_count = sentinels
        self.tls = tls
        if tls is not None:  # replication over TLS too; one binary built with TLS for servers and sentinels
            self.extra_args += ["--tls-replication", "yes", "--tls-client-cert-file", str(tls.client_cert),
                                "--tls-client-key-file", str(tls.client_key)]  # fmt: skip
            executable = executable or find_tls_redis_server()
        self.executable = executable
        self._sentinel_options = {"down_after_ms": down_after_ms, "failover_timeout_ms": failover_timeout_ms,
                                  "auth": sentinel_auth, "password": sentinel_password,
                                  "executable": executable, "tls": tls}  # fmt: skip

    def __enter__(self) -> "SentinelCluster":
        try:
            inspect_as = (self.admin["username"], self.admin["password"]) if self.admin else None
            servers = {"inspect_as": inspect_as, "executable": self.executable, "tls": self.tls}
            master = RedisServer(extra_args=self.extra_args, **servers).start()
            self.servers.append(master)
            replica_args = [*self.extra_args, "--replicaof", HOST, str(master.port)]
            replica = RedisServer(extra_args=replica_args, **servers).start()
            self.servers.append(replica)
            self._wait_replicating(replica)
            for _ in range(self._sentinel_count):
                self.sentinels.append(SentinelProcess(master.port, **self._sentinel_options).start())
            self._wait_until(lambda: self._sentinels_agree(master.port, known_replicas=1), 30, "sentinels to agree")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()

    def url(self, db: int = 0) -> str:
        return ";".join(f"sentinel://{HOST}:{sentinel.port}/{db}" for sentinel in self.sentinels)

    def master_port(self) -> int:
        with self.sentinels[0].client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(server for server in self.servers if server.port != port)

    def failover(self, timeout: float = 30) -> RedisServer:
        """SENTINEL FAILOVER: the replica is promoted, the old master becomes its replica; returns the new master
        once every sentinel names it and the old master replicates from it."""
        old = self.master_port()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        self._wait_until(lambda: self._sentinels_agree(exclude=old, known_replicas=1), timeout, "the failover")
        new = self.master()
        self._wait_replicating(next(server for server in self.servers if server.port == old))
        return new

    def kill_master(self, timeout: float = 30) -> RedisServer:
        """SIGKILL the master, wait for the sentinels to promote the replica, then start the old one again as
        a replica of the new master (as an operator or an orchestrator would); returns the new master."""
        old = self.master()
        old.kill()
        self._wait_until(lambda: self._sentinels_agree(exclude=old.port), timeout, "the promotion")
        new = self.master()
        old.extra_args = [*self.extra_args, "--replicaof", HOST, str(new.port)]
        old.start()
        self._wait_replicating(old)
        return new

    def _sentinels_agree(self, master_port: int | None = None, *, exclude: int | None = None,
                         known_replicas: int = 0) -> bool:  # fmt: skip
        ports = set()
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                    state = client.sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if (
                state["num-slaves"] < known_replicas
                or state["num-other-sentinels"] < len(self.sentinels) - 1
                or "failover_in_progress" in str(state["flags"])
            ):
                return False
            ports.add(int(port))
        if len(ports) != 1:
            return False
        port = ports.pop()
        if port == exclude or (master_port is not None and port != master_port):
            return False
        server = next(server for server in self.servers if server.port == port)
        with server.client(socket_timeout=5, **self.admin) as client:
            return client.execute_command("ROLE")[0] == b"master"

    def _wait_replicating(self, replica: RedisServer, timeout: float = 30) -> None:
        def linked() -> bool:
            with replica.client(socket_timeout=5, **self.admin) as client:
                info = client.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait_until(linked, timeout, f"the replica on {replica.port} to replicate")

    @staticmethod
    def _wait_until(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RedisServerError(f"timed out waiting for {what}")
            time.sleep(0.1)
