"""Redis high availability: sentinel:// URLs everywhere, and failovers that lose no accepted job.

Against real processes on loopback (tests/sentinel_cluster.py: a master, a replica, three sentinels) and real
workers. The last test is the one docs/RELIABILITY.md quotes: two planned failovers and one SIGKILL of the
master while a producer submits continuously and two workers serve.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from unittest import mock

import kronos_cases as kc
import pytest
import redis
from flower_process import Flower
from redis_server import TlsUnsupported, find_redis_server_at_least, find_tls_redis_server
from sentinel_cluster import MASTER_NAME, SentinelCluster
from tls_certs import CertificateError, make_tls_files
from worker_process import REPO_ROOT, WorkerProcess, worker_env

from tasks.connections import redis_client
from tasks.settings import SettingsError, load_settings

SENTINELS = "sentinel://10.0.0.1:26379/0;sentinel://10.0.0.2:26379/0;sentinel://10.0.0.3:26379/0"


def test_sentinel_urls_are_settings_like_any_other(tmp_path):
    settings = load_settings({"KRONOS_BROKER_URL": SENTINELS, "KRONOS_SENTINEL_MASTER": MASTER_NAME})
    assert settings.uses_sentinel and settings.sentinel_master == MASTER_NAME
    assert settings.result_backend == SENTINELS.replace("/0", "/1")  # DB 1 by default, for every sentinel
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    with_password = load_settings({"KRONOS_BROKER_URL": SENTINELS, "KRONOS_SENTINEL_MASTER": MASTER_NAME,
                                   "KRONOS_REDIS_PASSWORD_FILE": str(password)})  # fmt: skip
    assert with_password.broker_url.count("default:s3cret@") == 3
    with pytest.raises(SettingsError, match="KRONOS_SENTINEL_MASTER"):
        load_settings({"KRONOS_BROKER_URL": SENTINELS})
    with pytest.raises(SettingsError, match="both"):
        load_settings({"KRONOS_BROKER_URL": SENTINELS, "KRONOS_SENTINEL_MASTER": MASTER_NAME,
                       "KRONOS_RESULT_BACKEND": "redis://localhost:6379/1"})  # fmt: skip
    with pytest.raises(SettingsError, match="KRONOS_REPLICAS_TO_ACK"):
        load_settings({"KRONOS_REPLICAS_TO_ACK": "-1"})
    with pytest.raises(SettingsError, match="KRONOS_SENTINEL_TLS=1 needs sentinel://"):
        load_settings({"KRONOS_SENTINEL_TLS": "1"})


@pytest.fixture(scope="module")
def cluster():
    with SentinelCluster() as sentinels:
        yield sentinels


def sentinel_env(cluster: SentinelCluster, **overrides: str) -> dict[str, str]:
    settings = {
        "PYTHONPATH": str(REPO_ROOT),
        "KRONOS_BROKER_URL": cluster.url(0),
        "KRONOS_RESULT_BACKEND": cluster.url(1),
        "KRONOS_SENTINEL_MASTER": MASTER_NAME,
        "KRONOS_REPLICAS_TO_ACK": "1",
        "KRONOS_REPLICA_ACK_TIMEOUT": "2",
        # an idle worker must follow the master with its subscription to pushes (worker/wakeup.py), not wait
        # for a recheck, to pass the tests that submit after a failover
        "KRONOS_IDLE_RECHECK_SECONDS": "120",
    }
    return worker_env(dict(os.environ), **{**settings, **overrides})


def client_for(env: dict[str, str]):
    """A producer's client configured as `env` says (KronosClient reads the process environment once)."""
    from tasks.client import KronosClient

    with mock.patch.dict(os.environ, {key: value for key, value in env.items() if key.startswith("KRONOS_")}):
        return KronosClient()


def test_a_client_follows_the_master_through_a_failover(cluster):
    settings = load_settings({"KRONOS_BROKER_URL": cluster.url(0), "KRONOS_SENTINEL_MASTER": MASTER_NAME})
    with redis_client(settings.broker_url, settings) as client:
        client.set("before", "1")
        client.execute_command("WAIT", 1, 2000)
        cluster.failover()
        deadline = time.monotonic() + 10
        while True:  # the first command after the switch may meet the demoted master, once
            try:
                client.set("after", "1")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
        assert client.get("before") == b"1"
        assert client.execute_command("ROLE")[0] == b"master"


def test_a_worker_on_sentinel_urls_serves_and_its_answers_wait_for_a_replica(cluster):
    env = sentinel_env(cluster)
    with WorkerProcess(env, name="sentinel"), client_for(env) as client:
        job = client.submit(kc.candles().iloc[:48], pred_len=4, seed=1)
        assert len(job.wait(timeout=60).forecast["close"]) == 4
        with cluster.replica().client(1) as replica:  # the answer is on the replica as soon as it is read
            assert json.loads(replica.get(f"celery-task-meta-{job.id}"))["status"] == "SUCCESS"
        # the operator's tools reach the master the same way: the CLI, the health check, the queue depths
        for command in (["-m", "tasks.cli", "status", "--json"], ["-m", "worker.health"]):
            ran = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
        assert client.queue_depths() == {"kronos.kronos-small": 0, "kronos.kronos-base": 0, "kronos.kronos-mini": 0}


def test_without_enough_replicas_a_submit_is_refused_as_retryable_and_safe_to_repeat(cluster):
    from tasks.client import JobNotAccepted

    env = sentinel_env(cluster, KRONOS_REPLICAS_TO_ACK="2", KRONOS_REPLICA_ACK_TIMEOUT="0.2")  # there is one
    with client_for(env) as client:
        job_id = f"not-accepted-{uuid.uuid4()}"
        with pytest.raises(JobNotAccepted) as refused:
            client.submit(kc.candles().iloc[:48], pred_len=4, job_id=job_id)
        assert refused.value.retryable and refused.value.job_id == job_id
        assert not client.results.exists(f"kronos:job:{job_id}")  # so that submitting again sends it again


def test_an_answer_no_replica_has_confirmed_keeps_its_job_unacknowledged(cluster):
    """An answer on the master alone dies with it in a failover, while the job's ack, sent on a connection that
    has already found the new master, stands: the job is gone. So a final write counts only once a replica has
    confirmed it; until then the worker writes again and the job stays unacknowledged (this failed when an
    unconfirmed answer was only logged: three jobs of the failover run below were lost that way)."""
    env = sentinel_env(cluster, KRONOS_REPLICA_ACK_TIMEOUT="0.5")
    producer_env = {**env, "KRONOS_REPLICAS_TO_ACK": "0"}  # a stock producer: its message waits for nobody
    with WorkerProcess(env, name="unconfirmed") as worker, client_for(producer_env) as producer:
        replica = cluster.replica()
        replica.process.send_signal(signal.SIGSTOP)  # it stays connected, and confirms nothing
        try:
            job = producer.submit(kc.candles().iloc[:48], pred_len=4, seed=3)
            deadline = time.monotonic() + 60
            while json.loads(producer.results.get(f"celery-task-meta-{job.id}") or "{}").get("status") != "SUCCESS":
                assert time.monotonic() < deadline, "the answer was never written to the master"
                time.sleep(0.2)
            time.sleep(3)  # the old worker acknowledged within milliseconds of writing
            with cluster.master().client(0) as master:
                assert held(master, job.id), "the job was acknowledged on an answer only the master holds"
        finally:
            replica.process.send_signal(signal.SIGCONT)
        cluster._wait_replicating(replica)
        deadline = time.monotonic() + 60
        with cluster.master().client(0) as master:
            while held(master, job.id):
                assert time.monotonic() < deadline, "the job was never acknowledged once the replica was back"
                time.sleep(0.2)
        with replica.client(1) as copy:
            assert json.loads(copy.get(f"celery-task-meta-{job.id}"))["status"] == "SUCCESS"
        assert worker.process.poll() is None


def held(broker: redis.Redis, job_id: str) -> bool:
    """Whether a delivery of the job is recorded as unacknowledged."""
    return any(job_id.encode() in record for record in broker.hvals("unacked"))


# ---- the failover run docs/RELIABILITY.md quotes -------------------------------------------------------------

RUN_SECONDS_BETWEEN_SWITCHES = 6


class ContinuousProducer(threading.Thread):
    """Submits a job every `interval` s; a job counts as accepted once submit returns. On a retryable error it
    sends the same job id again, as a producer should; any other error is recorded as a failure of the test."""

    def __init__(self, env: dict[str, str], interval: float = 0.25):
        super().__init__(daemon=True)
        self.env = env
        self.interval = interval
        self.stop = threading.Event()
        self.accepted: dict[str, float] = {}  # job id -> when submit returned
        self.retryable_errors: list[tuple[float, str]] = []
        self.other_errors: list[str] = []

    def run(self) -> None:
        with client_for(self.env) as client:
            number = 0
            while not self.stop.is_set():
                job_id = f"ha-{number}"
                start = 100 + number % 300
                while not self.stop.is_set():
                    try:
                        client.submit(kc.candles().iloc[start : start + 48], pred_len=4, seed=number, job_id=job_id)
                        self.accepted[job_id] = time.monotonic()
                        break
                    except Exception as exc:
                        if getattr(exc, "retryable", False):
                            self.retryable_errors.append((time.monotonic(), type(exc).__name__))
                            time.sleep(0.2)
                        else:
                            self.other_errors.append(repr(exc))
                            break
                number += 1
                self.stop.wait(self.interval)


def test_failovers_lose_no_accepted_job_and_give_each_one_answer(cluster, tmp_path):
    env = sentinel_env(cluster, KRONOS_MAX_JOB_SECONDS="20", KRONOS_VISIBILITY_TIMEOUT="45",
                       KRONOS_UNACKED_RESTORE_INTERVAL="2")  # fmt: skip
    with (
        WorkerProcess(env, name="ha-a") as first,
        WorkerProcess(env, name="ha-b") as second,
        client_for(env) as reader,
    ):
        producer = ContinuousProducer(env)
        producer.start()
        switches = []
        try:
            for kind in ("planned", "planned", "unplanned"):
                time.sleep(RUN_SECONDS_BETWEEN_SWITCHES)
                started = time.monotonic()
                cluster.failover() if kind == "planned" else cluster.kill_master()
                switches.append((kind, started))
            time.sleep(RUN_SECONDS_BETWEEN_SWITCHES)
        finally:
            producer.stop.set()
            producer.join(timeout=30)
        answers = wait_for_answers(reader, list(producer.accepted), timeout=180)
        recoveries = [
            min((at for at in producer.accepted.values() if at > started), default=float("inf")) - started
            for _, started in switches
        ]
        report = {
            "accepted": len(producer.accepted),
            "answered": sum(1 for answer in answers.values() if answer is not None),
            "switches": [kind for kind, _ in switches],
            "seconds_to_next_accepted_job": [round(seconds, 2) for seconds in recoveries],
            "retryable_errors": sorted({name for _, name in producer.retryable_errors}),
            "retryable_error_count": len(producer.retryable_errors),
            "other_errors": producer.other_errors,
            "runs_per_job": runs_per_job(cluster, list(producer.accepted)),
        }
        print("failover run:", json.dumps(report))
        assert not producer.other_errors
        assert len(producer.accepted) > 50
        lost = [job_id for job_id, answer in answers.items() if answer is None]
        assert not lost, f"{len(lost)} accepted jobs never answered: {lost[:10]}"
        failed = {job_id: answer for job_id, answer in answers.items() if answer != "SUCCESS"}
        assert not failed, failed
        assert all(seconds < 60 for seconds in recoveries), recoveries
        assert first.process.poll() is None and second.process.poll() is None, "a worker died in a failover"
        job = reader.submit(kc.candles().iloc[:48], pred_len=4)
        assert len(job.wait(timeout=60).forecast["close"]) == 4


def wait_for_answers(client, job_ids: list[str], timeout: float) -> dict[str, str | None]:
    """Each job's final state, read once it is final; None for a job still without one at the timeout. A final
    answer is read twice, 2 s apart: it must not change (one final answer per job)."""
    answers: dict[str, str | None] = dict.fromkeys(job_ids)
    first_seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(answer is None for answer in answers.values()):
        for job_id in [job_id for job_id, answer in answers.items() if answer is None]:
            try:
                raw = client.results.get(f"celery-task-meta-{job_id}")
            except redis.ConnectionError:
                break
            document = json.loads(raw) if raw else {}
            if document.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                answers[job_id] = document["status"]
                first_seen[job_id] = raw
        time.sleep(0.5)
    time.sleep(2)
    for job_id, raw in first_seen.items():
        assert client.results.get(f"celery-task-meta-{job_id}") == raw, f"the answer of {job_id} changed"
    return answers


def runs_per_job(cluster: SentinelCluster, job_ids: list[str]) -> dict[str, int]:
    """How many jobs ran how many times (their claim records, worker/claims.py)."""
    counts: dict[str, int] = {}
    with cluster.master().client(1, decode_responses=True) as master:
        for job_id in job_ids:
            runs = master.hget(f"kronos:claim:{job_id}", "runs") or "0"
            counts[runs] = counts.get(runs, 0) + 1
    return counts


def test_the_generated_acl_users_work_over_sentinel_and_through_a_failover(tmp_path):
    """Replication, the sentinels, the worker and a producer each log in as their generated ACL user
    (ops/redis_acl.py), the sentinels have a password of their own, and a failover changes none of it."""
    from ops import redis_acl

    redis_7 = find_redis_server_at_least(7)
    if redis_7 is None:
        pytest.skip("ACL selectors need redis-server >= 7")
    deployment = {"KRONOS_PRODUCERS": "alpha", "KRONOS_SENTINEL_MASTER": MASTER_NAME,
                  "KRONOS_BROKER_URL": "sentinel://127.0.0.1:26379/0"}  # fmt: skip
    settings = load_settings(deployment)
    secrets = {user: f"pw-{user}-{uuid.uuid4().hex[:8]}" for user in [*redis_acl.users(settings), "admin", "sentinel"]}
    for user, password in secrets.items():
        (tmp_path / f"redis-{user}.password").write_text(password + "\n")
    acl = tmp_path / "users.acl"
    command = [sys.executable, "ops/redis_acl.py", "--secrets-dir", str(tmp_path), "--out", str(acl)]
    generated = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **deployment}, capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr
    assert {redis_acl.REPLICA_USER, redis_acl.SENTINEL_USER} <= set(redis_acl.users(settings))
    with acl.open("a") as file:
        file.write(f"user admin on {redis_acl.password_hash(secrets['admin'])} ~* &* +@all\n")
    server_args = ("--aclfile", str(acl), "--masteruser", redis_acl.REPLICA_USER,
                   "--masterauth", secrets[redis_acl.REPLICA_USER])  # fmt: skip
    with SentinelCluster(extra_args=server_args, admin=("admin", secrets["admin"]),
                         sentinel_auth=(redis_acl.SENTINEL_USER, secrets[redis_acl.SENTINEL_USER]),
                         sentinel_password=secrets["sentinel"], executable=redis_7) as cluster:  # fmt: skip

        def as_user(user: str, db: int) -> str:
            return cluster.url(db).replace("sentinel://", f"sentinel://{user}:{secrets[user]}@")

        env = sentinel_env(cluster, **{
            **deployment,
            "KRONOS_SENTINEL_PASSWORD_FILE": str(tmp_path / "redis-sentinel.password"),
            "KRONOS_BROKER_URL": as_user(redis_acl.WORKER_USER, 0),
            "KRONOS_RESULT_BACKEND": as_user(redis_acl.WORKER_USER, 1),
        })  # fmt: skip
        producer = {**env, "KRONOS_PRODUCER": "alpha", "KRONOS_BROKER_URL": as_user("alpha", 0),
                    "KRONOS_RESULT_BACKEND": as_user("alpha", 1)}  # fmt: skip
        with WorkerProcess(env, name="sentinel-acl") as worker, client_for(producer) as alpha:
            first = alpha.submit(kc.candles().iloc[:48], pred_len=4, seed=1)
            assert len(first.wait(timeout=60).forecast["close"]) == 4
            watch_with_flower(env, as_user(redis_acl.MONITOR_USER, 0), as_user(redis_acl.MONITOR_USER, 1), tmp_path)
            with cluster.master().client(0, **cluster.admin) as master:  # its user may hear pushes announced
                assert master.pubsub_numsub("__keyspace@0__:kronos.kronos-small.alpha")[0][1] >= 1
            cluster.failover()
            second = submit_until_accepted(alpha, job_id="after-failover")
            assert len(second.wait(timeout=60).forecast["close"]) == 4
            assert worker.process.poll() is None


def watch_with_flower(env: dict[str, str], broker_url: str, result_backend: str, tmp_path) -> None:
    """Flower, as the monitor user over the sentinels, shows the worker and the producer's queue."""
    login = tmp_path / "flower-basic-auth"
    login.write_text("ops:flower-pw\n")
    flower_env = {
        **env,
        "KRONOS_BROKER_URL": broker_url,
        "KRONOS_RESULT_BACKEND": result_backend,
        "KRONOS_FLOWER_BASIC_AUTH_FILE": str(login),
        "KRONOS_FLOWER_DB": str(tmp_path / "flower.db"),
    }
    flower = Flower(flower_env, ("ops", "flower-pw")).start()
    try:
        deadline = time.monotonic() + 30
        while not json.loads(flower.get("/workers?json=1"))["data"]:
            assert time.monotonic() < deadline, "Flower never saw the worker's events"
            time.sleep(0.5)
        assert "kronos.kronos-small.alpha" in flower.get("/broker").decode()
    finally:
        flower.stop()


def submit_until_accepted(client, **options):
    """A producer's retry loop: the same job id again after each retryable error, for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.submit(kc.candles().iloc[60:108], pred_len=4, **options)
        except Exception as exc:
            if not getattr(exc, "retryable", False) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_tls_to_the_sentinels_and_the_servers(tmp_path):
    """KRONOS_SENTINEL_TLS=1: the sentinels, the master and the replica speak TLS only (client certificates
    required), replication and the sentinels' own links included; a worker and a producer serve through it and
    through a failover."""
    try:
        files = make_tls_files(tmp_path / "tls")
        find_tls_redis_server()
    except (CertificateError, TlsUnsupported) as exc:
        pytest.skip(str(exc))
    with SentinelCluster(tls=files) as cluster:
        env = sentinel_env(cluster, **{
            "KRONOS_SENTINEL_TLS": "1",
            "KRONOS_REDIS_TLS_CA_FILE": str(files.ca),
            "KRONOS_REDIS_TLS_CERT_FILE": str(files.client_cert),
            "KRONOS_REDIS_TLS_KEY_FILE": str(files.client_key),
        })  # fmt: skip
        with WorkerProcess(env, name="sentinel-tls") as worker, client_for(env) as client:
            first = client.submit(kc.candles().iloc[:48], pred_len=4, seed=1)
            assert len(first.wait(timeout=60).forecast["close"]) == 4
            cluster.failover()
            second = submit_until_accepted(client, job_id="tls-after-failover")
            assert len(second.wait(timeout=60).forecast["close"]) == 4
            assert worker.process.poll() is None
