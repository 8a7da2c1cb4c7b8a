"""The test Redis harness: starts, answers, persists across restarts, and leaves nothing behind."""

import os
import socket

import pytest
import redis
from redis_server import SHARED_REDIS_PORT, RedisServer, RedisServerError, find_redis_server


def accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_redis_server_binary_is_found() -> None:
    assert os.access(find_redis_server(), os.X_OK)


def test_session_server_answers_on_its_own_port(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.port != SHARED_REDIS_PORT
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("dir")["dir"] == str(redis_server.directory)


def test_redis_url_gives_each_test_an_empty_server(redis_server: RedisServer, redis_url: str) -> None:
    with redis_server.client(db=3) as client:
        assert client.dbsize() == 0
        client.set("left-over", "1")


def test_celery_env_points_subprocesses_at_the_test_server(
    redis_server: RedisServer, celery_env: dict[str, str]
) -> None:
    assert celery_env["KRONOS_BROKER_URL"] == redis_server.url(0)
    assert celery_env["KRONOS_RESULT_BACKEND"] == redis_server.url(1)
    assert os.environ["KRONOS_BROKER_URL"] == redis_server.url(0)


def test_aof_keeps_data_across_restart_and_sigkill() -> None:
    with RedisServer(appendonly=True) as server:
        port, directory = server.port, server.directory
        with server.client() as client:
            client.set("job", "queued")
        server.restart()
        assert (server.port, server.directory) == (port, directory)
        with server.client() as client:
            assert client.get("job") == b"queued"
            client.set("after-restart", "1")
        # appendfsync always: a write acknowledged before SIGKILL is on disk.
        server.kill()
        assert not accepts_connections(port)
        server.start()
        with server.client() as client:
            assert client.mget("job", "after-restart") == [b"queued", b"1"]


def test_without_aof_a_restart_loses_data() -> None:
    with RedisServer() as server:
        with server.client() as client:
            client.set("job", "queued")
        server.restart()
        with server.client() as client:
            assert client.get("job") is None


def test_close_leaves_no_process_and_no_directory() -> None:
    server = RedisServer()
    with server:
        pid, port, directory = server.process.pid, server.port, server.directory
        assert process_exists(pid)
    assert server.process.returncode is not None
    assert not process_exists(pid)
    assert not accepts_connections(port)
    assert not directory.exists()


def test_extra_args_pass_through_and_require_a_password() -> None:
    with RedisServer(extra_args=["--requirepass", "s3cret"]) as server:
        with redis.Redis.from_url(server.url()) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis.from_url(server.url(password="s3cret")) as client:
            assert client.ping()


def test_failed_start_reports_the_log_and_leaves_no_process() -> None:
    server = RedisServer(extra_args=["--no-such-option", "1"])
    with pytest.raises(RedisServerError, match=r"(?i)bad directive|fatal|no-such-option"):
        server.start()
    assert not server.running
    server.close()
