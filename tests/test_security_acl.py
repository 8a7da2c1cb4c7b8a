"""Least privilege in Redis: a real redis-server started with the ACL file ops/redis_acl.py generates, a real
worker, producers and Flower each on their own user, and what each of them is refused.

Producers: alpha (default quota), beta (default quota), gamma (a quota of 3 jobs per minute, mode reject), all
served by one worker; delta (12 jobs per minute, mode wait) has a worker of its own. The file gets one extra
user, `admin`, that only the test uses to look behind the scenes.
"""

import json
import os
import pickle
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import kronos_cases as kc
import pytest
import redis
from flower_process import Flower
from redis_server import RedisServer, find_redis_server_at_least, free_port
from test_security import WritesMarker, envelope, pickle_envelope
from worker_process import REPO_ROOT, WorkerProcess, worker_env

from ops import redis_acl
from schemas import ErrorCode, ForecastRequest, JobFailed
from tasks.routing import FORECAST_TASK
from tasks.settings import load_settings
from worker.transport import POISON_KEY

pytestmark = pytest.mark.integration

MODEL = "kronos-small"
PRODUCERS = ("alpha", "beta", "gamma", "delta")
SERVED = PRODUCERS[:3]  # by the module's worker
GAMMA_QUOTA = 3
MAX_CANDLES = 500
MAX_PAYLOAD_BYTES = 80_000
FLOWER_LOGIN = ("ops", "flower-pw")
ADMIN = "admin"


def passwords() -> dict[str, str]:
    return {user: f"pw-{user}-{uuid.uuid4().hex[:8]}" for user in (*redis_acl.ROLE_USERS, *PRODUCERS, ADMIN)}


@pytest.fixture(scope="module")
def acl_env() -> dict[str, str]:
    return {"KRONOS_PRODUCERS": ",".join(PRODUCERS), "KRONOS_MODELS": MODEL, "KRONOS_DEFAULT_MODEL": MODEL}


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    return passwords()


@pytest.fixture(scope="module")
def server(acl_env, secrets, tmp_path_factory):
    executable = find_redis_server_at_least(7)
    if executable is None:
        pytest.skip("ACL selectors and %R~ key permissions need redis-server >= 7 (apt-get install redis-server)")
    directory = tmp_path_factory.mktemp("acl")
    for user, password in secrets.items():
        (directory / f"redis-{user}.password").write_text(password + "\n")
    acl_file = directory / "users.acl"
    generated = subprocess.run(
        [sys.executable, "ops/redis_acl.py", "--secrets-dir", str(directory), "--out", str(acl_file)],
        cwd=REPO_ROOT, env=dict(os.environ, **acl_env), capture_output=True, text=True,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    text = acl_file.read_text()
    assert all(password not in text for password in secrets.values())
    with acl_file.open("a") as file:
        file.write(f"user {ADMIN} on {redis_acl.password_hash(secrets[ADMIN])} ~* &* +@all\n")
    with RedisServer(extra_args=["--aclfile", str(acl_file)], executable=executable) as redis_server:
        yield redis_server


def url(server: RedisServer, secrets: dict[str, str], user: str, db: int = 0) -> str:
    return server.url(db, username=user, password=secrets[user])


def connect(server: RedisServer, secrets: dict[str, str], user: str, db: int = 0) -> redis.Redis:
    return server.client(db, username=user, password=secrets[user], decode_responses=True)


@pytest.fixture(scope="module")
def admin(server, secrets):
    """The test's own look at the broker DB (admin_results: the result DB)."""
    with connect(server, secrets, ADMIN) as client:
        client.acl_log_reset()
        yield client


@pytest.fixture(scope="module")
def admin_results(server, secrets):
    with connect(server, secrets, ADMIN, 1) as client:
        yield client


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def env(server, secrets, acl_env, metrics_port, admin):
    return worker_env(
        dict(os.environ),
        **{**acl_env, "KRONOS_PRODUCERS": ",".join(SERVED)},
        PYTHONPATH=str(REPO_ROOT),
        KRONOS_BROKER_URL=url(server, secrets, redis_acl.WORKER_USER, 0),
        KRONOS_RESULT_BACKEND=url(server, secrets, redis_acl.WORKER_USER, 1),
        KRONOS_PRODUCER_QUOTAS=f"gamma={GAMMA_QUOTA}",
        KRONOS_MAX_CANDLES=str(MAX_CANDLES),
        KRONOS_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD_BYTES),
        KRONOS_METRICS_PORT=str(metrics_port),
        KRONOS_METRICS_ADDRESS="127.0.0.1",
        KRONOS_MAX_RETRIES="0",
    )


def producer_client(server, secrets, producer: str):
    from tasks.client import KronosClient

    return KronosClient(url(server, secrets, producer, 0), url(server, secrets, producer, 1), producer=producer)


@pytest.fixture(scope="module")
def clients(server, secrets, acl_env, worker):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in acl_env.items():  # the producers' deployment settings: models served, producers
            patch.setenv(name, value)
        with (
            producer_client(server, secrets, "alpha") as alpha,
            producer_client(server, secrets, "beta") as beta,
            producer_client(server, secrets, "gamma") as gamma,
        ):
            yield {"alpha": alpha, "beta": beta, "gamma": gamma}


def window(rows: int = 64, start: int = 0):
    return kc.candles().iloc[start : start + rows]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refused(client: redis.Redis, *command) -> bool:
    try:
        client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    return False


def queue_of(producer: str) -> str:
    return f"kronos.{MODEL}.{producer}"


def test_the_default_user_is_off(server):
    with server.client() as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()


def test_a_producer_submits_and_reads_its_results(clients):
    job = clients["alpha"].submit(window(), pred_len=8, series_id="alpha-series", seed=1)
    assert job.id.startswith("alpha:")
    result = job.wait(timeout=60)
    assert result.job_id == job.id and len(result.forecast["close"]) == 8
    unprefixed = job.id.removeprefix("alpha:")
    assert clients["alpha"].job(unprefixed).wait(timeout=5).job_id == job.id
    assert clients["alpha"].queue_depths() == {queue_of("alpha"): 0}
    assert [heartbeat.queues for heartbeat in clients["alpha"].workers()] == [[queue_of(p) for p in SERVED]]


def test_a_producer_is_refused_administration_and_other_producers_data(server, secrets, clients):
    beta_job = clients["beta"].submit(window(start=100), pred_len=4, series_id="beta-secret")
    beta_job.wait(timeout=60)
    with connect(server, secrets, "alpha", 1) as results, connect(server, secrets, "alpha", 0) as broker:
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0")):
            assert refused(broker, *command), command
        own_queue = queue_of("alpha")
        assert refused(broker, "DEL", own_queue)
        assert refused(broker, "DEL", f"{own_queue}\x06\x165")
        assert refused(broker, "LRANGE", own_queue, 0, -1)  # other jobs' payloads: not its business
        assert refused(broker, "RPOP", own_queue)
        assert refused(broker, "LPUSH", queue_of("beta"), "x")
        assert refused(broker, "LPUSH", f"{queue_of('beta')}\x06\x165", "x")
        assert refused(broker, "HGETALL", "unacked")
        assert refused(broker, "HSET", "kronos:workers", "fake@host", "{}")
        assert refused(broker, "EVAL", "return 1", 0)
        assert refused(results, "GET", f"celery-task-meta-{beta_job.id}")
        assert refused(results, "DEL", f"celery-task-meta-{beta_job.id}")
        assert refused(results, "SET", f"celery-task-meta-{beta_job.id}", "{}")
        assert refused(results, "GET", f"kronos:job:{beta_job.id}")
        with results.pubsub() as listener, pytest.raises(redis.exceptions.NoPermissionError):
            listener.subscribe(f"celery-task-meta-{beta_job.id}")
            listener.get_message(timeout=5)
        assert not refused(broker, "LLEN", own_queue)  # what it does need still works
        assert not refused(broker, "HGETALL", "kronos:workers")
    from tasks.client import JobNotFound

    with pytest.raises(JobNotFound):  # through the client, another producer's id names one of its own
        clients["alpha"].job(beta_job.id)


def forecast_envelope(job_id: str, routed_to: str, **embed) -> str:
    """A JSON forecast message pushed by hand, as a hostile producer would: `routed_to` is the route it claims."""
    frame = window(32, start=300)
    request = ForecastRequest.from_frame(frame, pred_len=4, series_id="pushed-by-hand").model_dump(mode="json")
    body = [[request], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **embed}]
    return envelope(job_id, json.dumps(body).encode(), "application/json", routed_to)


def wait_for(condition, timeout: float = 30, what: str = "condition") -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_job_id_outside_the_producers_namespace_is_never_run_nor_stored(
    server, secrets, clients, admin, admin_results, worker
):
    victim = clients["beta"].submit(window(start=200), pred_len=4, series_id="beta-victim")
    stored = victim.wait(timeout=60)
    before = admin_results.get(f"celery-task-meta-{victim.id}")
    poison_before = admin.llen(POISON_KEY)
    with connect(server, secrets, "alpha") as alpha:
        alpha.lpush(f"{queue_of('alpha')}\x06\x165", forecast_envelope(victim.id, queue_of("alpha")))
        chained = forecast_envelope("alpha:with-callback", queue_of("alpha"), callbacks=[{"task": "celery.map"}])
        alpha.lpush(f"{queue_of('alpha')}\x06\x165", chained)
    wait_for(lambda: admin.llen(POISON_KEY) == poison_before + 2, what="both messages quarantined")
    assert admin_results.get(f"celery-task-meta-{victim.id}") == before  # beta's result untouched
    assert not admin_results.exists("celery-task-meta-alpha:with-callback")
    assert victim.id in " ".join(admin.lrange(POISON_KEY, 0, 1))
    assert clients["beta"].job(victim.id).wait(timeout=5) == stored
    assert "outside producer alpha's namespace" in worker.log() and "follow-up work" in worker.log()
    assert secrets[redis_acl.WORKER_USER] not in worker.log()


def test_a_forged_route_cannot_move_a_job_to_another_producer(server, secrets, clients, admin, admin_results):
    job_id = f"alpha:{uuid.uuid4()}"
    with connect(server, secrets, "alpha") as alpha:
        # it claims to come from gamma's queue: it is alpha's job all the same, charged to alpha's quota
        alpha.lpush(f"{queue_of('alpha')}\x06\x165", forecast_envelope(job_id, queue_of("gamma")))
    wait_for(lambda: admin_results.exists(f"celery-task-meta-{job_id}"), what="the result")
    assert clients["alpha"].job(job_id).wait(timeout=60).job_id == job_id
    assert json.loads(admin_results.get(f"celery-task-meta-{job_id}"))["queue"] == queue_of("alpha")
    assert admin.exists("kronos:quota:alpha") and not admin.exists("kronos:quota:gamma")  # gamma's turn comes later


def test_a_pickle_payload_from_a_producer_is_refused_and_never_runs(server, secrets, clients, tmp_path):
    marker = tmp_path / "pwned"
    job_id = f"alpha:{uuid.uuid4()}"
    payload = pickle.dumps(((WritesMarker(marker),), {}, {}))
    with connect(server, secrets, "alpha") as alpha:
        alpha.lpush(f"{queue_of('alpha')}\x06\x165", pickle_envelope(job_id, payload, queue_of("alpha")))
    with pytest.raises(JobFailed) as failure:
        wait_for(lambda: clients["alpha"]._is_known(job_id), what="the stored failure")
        clients["alpha"].job(job_id).wait(timeout=30)
    assert failure.value.error.code == ErrorCode.INVALID_INPUT
    assert not marker.exists()


def test_over_limit_payloads_fail_with_their_codes(clients):
    too_many = window(MAX_CANDLES + 100)
    too_large = window(2400)
    size = {
        frame is too_large: len(ForecastRequest.from_frame(frame, pred_len=4, series_id="x").model_dump_json())
        for frame in (too_many, too_large)
    }
    assert size[True] > 1.3 * MAX_PAYLOAD_BYTES and size[False] < MAX_PAYLOAD_BYTES / 1.3
    jobs = {
        "max_candles": clients["alpha"].submit(too_many, pred_len=4),
        "max_payload_bytes": clients["alpha"].submit(too_large, pred_len=4),
    }
    fine = clients["beta"].submit(window(), pred_len=4)
    # one message is one job: a producer cannot slip a second request into it
    two = ForecastRequest.from_frame(window(), pred_len=4, series_id="two").model_dump(mode="json")
    clients["alpha"].app.send_task(
        FORECAST_TASK, args=[two, two], task_id="alpha:two-in-one", queue=queue_of("alpha"), priority=5
    )
    wait_for(lambda: clients["alpha"]._is_known("alpha:two-in-one"), what="the stored failure")
    with pytest.raises(JobFailed) as failure:
        clients["alpha"].job("two-in-one").wait(timeout=30)
    assert failure.value.error.code == ErrorCode.INVALID_INPUT
    for limit, job in jobs.items():
        with pytest.raises(JobFailed) as failure:
            job.wait(timeout=60)
        assert failure.value.error.code == ErrorCode.INVALID_INPUT
        assert failure.value.error.details["limit"] == limit
    assert len(fine.wait(timeout=60).forecast["close"]) == 4


def test_an_over_quota_producer_is_rate_limited_while_others_are_served(clients, metrics_port):
    gamma_jobs = [clients["gamma"].submit(window(start=10 * i), pred_len=4) for i in range(GAMMA_QUOTA + 3)]
    alpha_jobs = [clients["alpha"].submit(window(start=10 * i), pred_len=4) for i in range(4)]
    outcomes = []
    for job in gamma_jobs:
        try:
            job.wait(timeout=60)
            outcomes.append("ok")
        except JobFailed as failure:
            outcomes.append(failure.error.code)
            assert failure.error.details["producer"] == "gamma" and failure.error.details["retry_after"] > 0
    assert outcomes.count("ok") == GAMMA_QUOTA and outcomes.count(ErrorCode.RATE_LIMITED) == 3
    assert all(len(job.wait(timeout=60).forecast["close"]) == 4 for job in alpha_jobs)
    metrics = scrape(metrics_port)
    assert sample(metrics, "kronos_quota_exceeded_total", producer="gamma", action="rejected") == 3
    assert sample(metrics, "kronos_quota_exceeded_total", producer="alpha") == 0


def test_in_wait_mode_an_over_quota_job_runs_when_its_token_comes(server, secrets, env, acl_env, monkeypatch):
    for name, value in acl_env.items():
        monkeypatch.setenv(name, value)
    waiting_env = dict(
        env,
        KRONOS_PRODUCERS="delta",
        KRONOS_PRODUCER_QUOTAS="delta=12",
        KRONOS_QUOTA_MODE="wait",
        KRONOS_METRICS_PORT="0",
    )
    with WorkerProcess(waiting_env, name="waiting") as waiting, producer_client(server, secrets, "delta") as delta:
        jobs = [delta.submit(window(start=5 * i), pred_len=4) for i in range(14)]
        finished = sorted(job.wait(timeout=90).finished_at.timestamp() for job in jobs)
        over_quota = r"job (delta:\S+): producer delta is over its quota of 12 jobs per minute; runs in"
        assert len(set(re.findall(over_quota, waiting.log()))) == 2
    # a minute's worth (12) at once; the 13th and 14th hold the next two tokens, 5 s apart
    assert finished[-1] - finished[0] >= 9.0
    assert finished[12] - finished[0] >= 4.0


def test_the_monitor_user_runs_flower_and_cannot_touch_jobs(server, secrets, env, clients, tmp_path):
    flower_env = dict(
        env,
        KRONOS_BROKER_URL=url(server, secrets, redis_acl.MONITOR_USER, 0),
        KRONOS_RESULT_BACKEND=url(server, secrets, redis_acl.MONITOR_USER, 1),
        KRONOS_FLOWER_BASIC_AUTH=":".join(FLOWER_LOGIN),
        KRONOS_FLOWER_DB=str(tmp_path / "flower.db"),
    )
    flower = Flower(flower_env, FLOWER_LOGIN).start()
    try:
        for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks"):
            with pytest.raises(urllib.error.HTTPError) as denied:
                flower.get(path, auth=False)
            assert denied.value.code == 401
        wait_for(lambda: json.loads(flower.get("/api/workers?refresh=1")), what="Flower to see the worker")
        broker_page = flower.get("/broker").decode()
        assert queue_of("gamma") in broker_page
        assert secrets[redis_acl.MONITOR_USER] not in broker_page
    finally:
        flower.stop()
    monitor_env = dict(flower_env, KRONOS_PRODUCERS=",".join(SERVED))
    for command in (["-m", "worker.health"], ["-m", "tasks.cli", "status"], ["-m", "tasks.deadletter", "list"]):
        completed = subprocess.run([sys.executable, *command], env=monitor_env, cwd=REPO_ROOT, capture_output=True,
                                   text=True, timeout=60)  # fmt: skip
        assert completed.returncode == 0, f"{command}: {completed.stdout}{completed.stderr}"
        assert secrets[redis_acl.MONITOR_USER] not in completed.stdout + completed.stderr
    with connect(server, secrets, redis_acl.MONITOR_USER) as monitor:
        assert not refused(monitor, "LLEN", queue_of("alpha"))
        assert not refused(monitor, "HGETALL", "kronos:workers")
        for command in (("LPUSH", queue_of("alpha"), "x"), ("DEL", queue_of("alpha")), ("FLUSHALL",), ("KEYS", "*")):
            assert refused(monitor, *command), command
        monitor.execute_command("SELECT", 1)
        assert refused(monitor, "GET", f"celery-task-meta-alpha:{uuid.uuid4()}")


def test_no_legitimate_use_was_refused(admin):
    """Runs last: every ACL denial Redis logged came from the probes above, none from the roles' own work."""
    monitor_probes = ("flushall", "keys", "get", queue_of("alpha"))
    denials = [(entry["username"], entry["reason"], entry["context"], entry["object"]) for entry in admin.acl_log(1000)]
    probed = [d for d in denials if d[0] == redis_acl.MONITOR_USER and d[2] == "toplevel" and d[3] in monitor_probes]
    by_roles = [denial for denial in denials if denial[0] in redis_acl.ROLE_USERS and denial not in probed]
    assert by_roles == [], sorted(set(by_roles))
    assert {user for user, *_ in denials} <= {"alpha", redis_acl.MONITOR_USER}, denials  # the probing users


def test_the_acl_file_gives_each_producer_only_its_own_keys(acl_env, secrets):
    settings = load_settings(dict(acl_env))
    text = redis_acl.render(settings, {user: redis_acl.password_hash(pw) for user, pw in secrets.items()})
    alpha = next(line for line in text.splitlines() if line.startswith("user alpha "))
    assert "beta" not in alpha and "gamma" not in alpha
    assert "~celery-task-meta-alpha:*" in alpha and "&celery-task-meta-alpha:*" in alpha
    assert text.splitlines()[0] == "user default off resetkeys resetchannels -@all"
    assert all(password not in text for password in secrets.values())


def test_the_acl_generator_refuses_a_reserved_name_and_a_missing_password(tmp_path):
    reserved = subprocess.run(
        [sys.executable, "ops/redis_acl.py", "--print-users"], cwd=REPO_ROOT, capture_output=True, text=True,
        env=dict(os.environ, KRONOS_PRODUCERS="alpha,kronos-worker"),
    )  # fmt: skip
    assert reserved.returncode == 2 and "reserved" in reserved.stderr
    missing = subprocess.run(
        [sys.executable, "ops/redis_acl.py", "--secrets-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
        text=True, env=dict(os.environ, KRONOS_PRODUCERS="alpha"),
    )  # fmt: skip
    assert missing.returncode != 0 and "redis-kronos-worker.password" in missing.stderr
