"""Least privilege in Redis: a real redis-server started with the ACL file ops/redis_acl.py generates, a real
worker, producers and Flower each on their own user, and what each of them is refused.

Producers: alpha (default quota), beta (default quota), gamma (a quota of 3 jobs per minute, mode reject), all
served by one worker; delta (12 jobs per minute, mode wait) has a worker of its own. The file gets one extra
user, `admin`, that only the test uses to look behind the scenes.
"""

import base64
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import threading
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
from tasks.deadletter import DEAD_LETTER_KEY
from tasks.keys import DELAYED_KEY
from tasks.routing import FORECAST_TASK
from tasks.settings import load_settings
from worker.transport import POISON_KEY

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
def redis_7() -> str:
    executable = find_redis_server_at_least(7)
    if executable is None:
        pytest.skip("ACL selectors and %R~ key permissions need redis-server >= 7 (apt-get install redis-server)")
    return executable


@pytest.fixture(scope="module")
def acl_file(acl_env, secrets, tmp_path_factory):
    """The generated ACL file, plus the test's `admin` user."""
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
    return acl_file


@pytest.fixture(scope="module")
def server(acl_file, redis_7, secrets):
    admin = (ADMIN, secrets[ADMIN])
    with RedisServer(extra_args=["--aclfile", str(acl_file)], executable=redis_7, inspect_as=admin) as redis_server:
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


def served_env(server, secrets, acl_env, metrics_port, **overrides: str) -> dict[str, str]:
    """The environment of a worker serving alpha, beta and gamma as its own Redis user."""
    settings = {
        **acl_env,
        "KRONOS_PRODUCERS": ",".join(SERVED),
        "PYTHONPATH": str(REPO_ROOT),
        "KRONOS_BROKER_URL": url(server, secrets, redis_acl.WORKER_USER, 0),
        "KRONOS_RESULT_BACKEND": url(server, secrets, redis_acl.WORKER_USER, 1),
        "KRONOS_PRODUCER_QUOTAS": f"gamma={GAMMA_QUOTA}",
        "KRONOS_MAX_CANDLES": str(MAX_CANDLES),
        "KRONOS_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD_BYTES),
        "KRONOS_METRICS_PORT": str(metrics_port),
        "KRONOS_METRICS_ADDRESS": "127.0.0.1",
        "KRONOS_MAX_RETRIES": "0",
    }
    return worker_env(dict(os.environ), **{**settings, **overrides})


@pytest.fixture(scope="module")
def env(server, secrets, acl_env, metrics_port, admin):
    return served_env(server, secrets, acl_env, metrics_port)


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


def allowed(admin: redis.Redis, user: str, *command) -> bool:
    """Whether Redis's ACL lets `user` run `command`, checked without running it (ACL DRYRUN)."""
    return admin.execute_command("ACL", "DRYRUN", user, *command) == "OK"


def logged_denials(admin: redis.Redis) -> set[tuple]:
    return {(entry["username"], entry["reason"], entry["context"], entry["object"]) for entry in admin.acl_log(1000)}


PROBED: set[tuple] = set()  # denials the probes below caused on purpose (test_no_legitimate_use_was_refused)


@contextlib.contextmanager
def probing(admin: redis.Redis, user: str):
    """Denials of `user` that Redis logs while the block runs are the probe's own."""
    before = logged_denials(admin)
    try:
        yield
    finally:
        PROBED.update(denial for denial in logged_denials(admin) - before if denial[0] == user)


def run_python(env: dict[str, str], *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def role_env(env: dict[str, str], server: RedisServer, secrets: dict[str, str], user: str) -> dict[str, str]:
    """A process of the deployment connecting as `user` (Flower, the operator's tools, a producer)."""
    return dict(
        env, KRONOS_BROKER_URL=url(server, secrets, user, 0), KRONOS_RESULT_BACKEND=url(server, secrets, user, 1)
    )


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


def test_the_worker_user_hears_pushes_onto_its_queues_and_producers_do_not(server, secrets, clients, admin):
    """Idle workers wait for Redis's announcements of pushes (worker/wakeup.py): the worker's user may subscribe
    to those of its queues and its probes; a producer may not listen to any queue's traffic."""
    channel = f"__keyspace@0__:{queue_of('alpha')}"
    assert admin.pubsub_numsub(channel)[0][1] >= 1, "the worker is not subscribed (its ACL refused?)"
    with connect(server, secrets, "alpha") as alpha:
        assert refused(alpha, "SUBSCRIBE", channel)
        assert refused(alpha, "PSUBSCRIBE", "__keyspace@0__:*")
        # nor wake idle workers, nor take or drop a queue group's listener lease
        assert refused(alpha, "LPUSH", "kronos:wake:0123456789abcdef", "1")
        assert refused(alpha, "SET", "kronos:listener:0123456789abcdef", "forged")
        assert refused(alpha, "DEL", "kronos:listener:0123456789abcdef")


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
    # alpha's own id: refused, never run, and answered so that alpha learns why (stored after the quarantine)
    wait_for(lambda: admin_results.exists("celery-task-meta-alpha:with-callback"), what="the refusal answered")
    assert admin_results.get(f"celery-task-meta-{victim.id}") == before  # beta's result untouched
    refusal = json.loads(admin_results.get("celery-task-meta-alpha:with-callback"))
    assert refusal["status"] == "FAILURE" and "follow-up work" in refusal["result"]["exc_message"][0]["message"]
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
        delayed = len(set(re.findall(over_quota, waiting.log())))
    # A minute's worth (12) at once; the 13th and 14th hold the next two tokens, 5 s apart. On a machine slow
    # enough that the 14 jobs take more than 5 s to be charged, a token comes back meanwhile: one is delayed.
    assert delayed in (1, 2)
    assert finished[-1] - finished[0] >= 4.0 + 5.0 * (delayed - 1)


def test_the_monitor_user_runs_flower_and_cannot_touch_jobs(server, secrets, env, clients, admin, tmp_path):
    login_file = tmp_path / "flower-basic-auth"
    login_file.write_text(":".join(FLOWER_LOGIN) + "\n")
    flower_env = dict(
        role_env(env, server, secrets, redis_acl.MONITOR_USER),
        KRONOS_FLOWER_BASIC_AUTH_FILE=str(login_file),
        KRONOS_FLOWER_DB=str(tmp_path / "flower.db"),
    )
    flower = Flower(flower_env, FLOWER_LOGIN).start()
    try:
        for path in ("/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks"):
            with pytest.raises(urllib.error.HTTPError) as denied:
                flower.get(path, auth=False)
            assert denied.value.code == 401
        # the workers' own events (heartbeats) are what the monitor sees of them
        wait_for(lambda: json.loads(flower.get("/workers?json=1"))["data"], what="Flower to see the worker")
        broker_page = flower.get("/broker").decode()
        assert queue_of("gamma") in broker_page
        assert secrets[redis_acl.MONITOR_USER] not in broker_page
        with pytest.raises(urllib.error.HTTPError) as refused_revoke:  # another producer's future job
            flower.post(f"/api/task/revoke/beta:{uuid.uuid4()}")
        assert refused_revoke.value.code == 500
    finally:
        flower.stop()
    monitor_env = dict(flower_env, KRONOS_PRODUCERS=",".join(SERVED))
    for command in (["-m", "worker.health"], ["-m", "tasks.cli", "status"]):
        completed = run_python(monitor_env, *command)
        assert completed.returncode == 0, f"{command}: {completed.stdout}{completed.stderr}"
        assert secrets[redis_acl.MONITOR_USER] not in completed.stdout + completed.stderr
    with connect(server, secrets, redis_acl.MONITOR_USER) as monitor, probing(admin, redis_acl.MONITOR_USER):
        assert not refused(monitor, "LLEN", queue_of("alpha"))
        assert not refused(monitor, "HGETALL", "kronos:workers")
        for command in (("LPUSH", queue_of("alpha"), "x"), ("DEL", queue_of("alpha")), ("FLUSHALL",), ("KEYS", "*")):
            assert refused(monitor, *command), command
        monitor.execute_command("SELECT", 1)
        assert refused(monitor, "GET", f"celery-task-meta-alpha:{uuid.uuid4()}")


def test_flower_as_the_operator_inspects_workers(server, secrets, env, worker, tmp_path):
    flower_env = dict(
        role_env(env, server, secrets, redis_acl.OPERATOR_USER),
        KRONOS_FLOWER_ROLE="operator",
        KRONOS_FLOWER_BASIC_AUTH=":".join(FLOWER_LOGIN),
        KRONOS_FLOWER_DB=str(tmp_path / "flower.db"),
    )
    flower = Flower(flower_env, FLOWER_LOGIN).start()
    try:
        workers = {}
        wait_for(lambda: workers.update(json.loads(flower.get("/api/workers?refresh=1"))) or workers,
                 what="Flower to inspect the worker")  # fmt: skip
        assert [info["active_queues"] for info in workers.values()]
    finally:
        flower.stop()
    # the dead letters' contents are the operator's to read (each holds a job's request)
    listed = run_python(dict(flower_env, KRONOS_PRODUCERS=",".join(SERVED)), "-m", "tasks.deadletter", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr


# --- finding 7: no user but the worker runs Lua --------------------------------------------------------------

SCRIPTING = (
    ("EVAL", "return 1", "0"),
    ("EVAL_RO", "return 1", "0"),
    ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    ("SCRIPT", "LOAD", "while true do end"),
    ("FUNCTION", "LOAD", "#!lua name=spin\nredis.register_function('spin', function() while true do end end)"),
    ("FCALL", "spin", "0"),
)


def test_no_user_but_the_worker_may_run_or_load_a_script(server, secrets, admin, acl_env):
    """A Lua script runs to its end while every other client gets BUSY: loading and calling one froze Redis."""
    spin = admin.script_load("while true do end")
    with connect(server, secrets, redis_acl.MONITOR_USER) as monitor, probing(admin, redis_acl.MONITOR_USER):
        assert refused(monitor, "SCRIPT", "LOAD", "while true do end")
        assert refused(monitor, "EVALSHA", spin, 0)  # the call that froze every client
    scripted = {user for user in redis_acl.users(load_settings(dict(acl_env))) for command in SCRIPTING
                if allowed(admin, user, *command)}  # fmt: skip
    assert scripted == {redis_acl.WORKER_USER}


def test_the_operator_stops_a_runaway_script(acl_file, redis_7, secrets):
    """Should a script of the worker's ever run away, the operator can end it (SCRIPT KILL); nobody else can."""
    with RedisServer(
        extra_args=["--aclfile", str(acl_file), "--busy-reply-threshold", "100"], executable=redis_7
    ) as busy:
        with connect(busy, secrets, ADMIN) as admin:
            killers = {user for user in (*redis_acl.ROLE_USERS, *PRODUCERS) if allowed(admin, user, "SCRIPT", "KILL")}
        assert killers == {redis_acl.OPERATOR_USER}
        with connect(busy, secrets, redis_acl.WORKER_USER) as worker_user:
            ended = []

            def spin():
                try:
                    worker_user.eval("while true do end", 0)
                except redis.exceptions.ResponseError as error:
                    ended.append(str(error))

            spinning = threading.Thread(target=spin)
            spinning.start()
            try:
                with connect(busy, secrets, ADMIN) as admin:
                    wait_for(lambda: answers_busy(admin), what="the script to make Redis busy")
                with connect(busy, secrets, redis_acl.OPERATOR_USER) as operator:
                    assert operator.script_kill()
                spinning.join(10)
                assert ended and "killed by user" in ended[0]
            finally:
                if spinning.is_alive():  # the test's own user ends what the operator could not
                    with connect(busy, secrets, ADMIN) as admin:
                        admin.script_kill()
                    spinning.join(10)
        with connect(busy, secrets, ADMIN) as admin:
            assert admin.ping()


def answers_busy(client: redis.Redis) -> bool:
    """Whether Redis answers BUSY (a script runs) instead of PONG."""
    try:
        client.ping()
    except redis.exceptions.ResponseError as error:
        return str(error).startswith("BUSY")
    return False


def test_the_monitor_keeps_its_event_queues_binding_without_a_script(server, secrets, admin):
    """kombu binds an expiring queue (Flower's events, a control reply) and keeps it alive with Lua scripts;
    the transport of every process but the workers does the same with commands the monitor may run."""
    from kombu import Connection, Exchange, Queue

    from tasks.monitor_transport import Transport

    events = Queue(f"celeryev.{uuid.uuid4()}", Exchange("celeryev", type="fanout"), routing_key="#", expires=60)
    member = "\x06\x16".join(("#", "", events.name))
    before = logged_denials(admin)
    with Connection(url(server, secrets, redis_acl.MONITOR_USER), transport=Transport) as connection:
        channel = connection.channel()
        declared_at = time.time() * 1000
        events(channel).declare()
        assert member in admin.smembers("_kombu.binding.celeryev")
        deadline = admin.zscore("_kombu.binding_deadlines", "celeryev")
        assert deadline >= declared_at + 3_600_000  # kombu's shortest binding lifetime: an hour
        time.sleep(0.01)
        channel._refresh_bindings([events.name])  # what kombu runs every third of that lifetime, in a pipeline
        assert admin.zscore("_kombu.binding_deadlines", "celeryev") > deadline
        assert channel.sweep_bindings() == 0  # the workers sweep
        events(channel).delete()
    assert member not in admin.smembers("_kombu.binding.celeryev")
    assert [denial for denial in logged_denials(admin) - before if denial[0] == redis_acl.MONITOR_USER] == []


# --- finding 8: producers publish task-sent events, nobody else's -------------------------------------------


def test_a_producer_publishes_its_task_sent_events_but_cannot_listen_to_anyones(server, secrets, clients, admin):
    sent_events = "/0.celeryev/task.sent"
    with connect(server, secrets, redis_acl.MONITOR_USER) as monitor, monitor.pubsub() as flower_view:
        flower_view.subscribe(sent_events)
        assert flower_view.get_message(timeout=5)["type"] == "subscribe"
        job = clients["beta"].submit(window(start=60), pred_len=4, series_id="beta-sent")
        seen = [flower_view.get_message(timeout=5) for _ in range(3)]
        events = [event_of(message["data"]) for message in seen if message]
        assert any(event["uuid"] == job.id for event in events), events  # Flower still lists the job
    job.wait(timeout=60)
    with connect(server, secrets, "alpha") as alpha:
        for subscribe in ("subscribe", "psubscribe"):
            with alpha.pubsub() as eavesdropper, pytest.raises(redis.exceptions.NoPermissionError):
                getattr(eavesdropper, subscribe)(sent_events)
                eavesdropper.get_message(timeout=5)
        # its results' channels are for listening: the worker announces results there, not the producer
        assert refused(alpha, "PUBLISH", f"celery-task-meta-alpha:{uuid.uuid4()}", "{}")


def event_of(published: str) -> dict:
    """The Celery event inside a message kombu published on an event channel."""
    message = json.loads(published)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return json.loads(body)


# --- finding 9: producers write no bindings and only their queues' real lists --------------------------------


def binding(queue: str) -> str:
    """kombu's member of a queue's binding table: routing key, pattern and queue, joined by its separator."""
    return "\x06\x16".join((queue, "", queue))


def test_a_producer_cannot_bind_its_queue_to_any_other_key(server, secrets, admin):
    """A binding decides where a requeued job goes: one to the dead-letter list had a warm shutdown restore
    jobs into a key the producer cannot touch."""
    queue = queue_of("alpha")
    with connect(server, secrets, "alpha") as alpha:
        for table in (f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"):
            assert refused(alpha, "SADD", table, "\x06\x16".join((queue, "", DEAD_LETTER_KEY)))
            assert refused(alpha, "SREM", table, binding(queue))
    assert admin.smembers(f"_kombu.binding.{queue}") == {binding(queue)}  # as the worker declared it


def test_a_producer_pushes_only_onto_its_queues_priority_lists(server, secrets, admin):
    queue = queue_of("alpha")
    served = [queue, *(f"{queue}\x06\x16{digit}" for digit in range(1, 10))]  # priority 0 is the bare queue
    assert all(allowed(admin, "alpha", "LPUSH", key, "x") for key in served)
    with connect(server, secrets, "alpha") as alpha:
        for unread in ("0", "10", "x", "", "5x", "\x06\x165", "*"):
            assert refused(alpha, "LPUSH", f"{queue}\x06\x16{unread}", "x"), unread
        assert refused(alpha, "LPUSH", f"{queue}.extra", "x")


def test_producers_send_without_declaring_even_before_any_worker_ran(
    acl_file, redis_7, secrets, env, acl_env, monkeypatch
):
    """The worker declares the queues it consumes; a producer's job sent before any worker ever ran waits in
    its queue and is served once one starts."""
    for name, value in acl_env.items():
        monkeypatch.setenv(name, value)
    with (
        RedisServer(
            extra_args=["--aclfile", str(acl_file)], executable=redis_7, inspect_as=(ADMIN, secrets[ADMIN])
        ) as fresh,
        connect(fresh, secrets, ADMIN) as admin,
        producer_client(fresh, secrets, "alpha") as alpha,
    ):
        early = alpha.submit(window(start=20), pred_len=4, series_id="before-any-worker")
        assert admin.acl_log(100) == []
        # `celery call` sends too, under a plain UUID: outside alpha's namespace, so its result channel is
        # refused to alpha and the worker will refuse the job (SECURITY.md); what matters here is the send
        request = ForecastRequest.from_frame(window(start=30), pred_len=4, series_id="by-celery-call")
        called = run_python(
            dict(role_env(env, fresh, secrets, "alpha"), KRONOS_PRODUCER="alpha"),
            "-m", "celery", "-A", "tasks.app", "call", FORECAST_TASK, "--queue", queue_of("alpha"),
            "--args", json.dumps([request.model_dump(mode="json")]),
        )  # fmt: skip
        assert called.returncode == 0, called.stderr
        assert admin.llen(f"{queue_of('alpha')}\x06\x165") + admin.llen(queue_of("alpha")) == 2
        assert admin.keys("_kombu.binding*") == []
        assert [entry["object"] for entry in admin.acl_log(100)] == [f"celery-task-meta-{called.stdout.strip()}"]
        serving = dict(role_env(env, fresh, secrets, redis_acl.WORKER_USER), KRONOS_METRICS_PORT="0")
        with WorkerProcess(serving, name="first"):
            assert len(early.wait(timeout=60).forecast["close"]) == 4
        assert binding(queue_of("alpha")) in admin.smembers(f"_kombu.binding.{queue_of('alpha')}")
        assert {entry["username"] for entry in admin.acl_log(100)} == {"alpha"}  # the worker was refused nothing


@pytest.mark.parametrize("example", ["shell/enqueue.sh", "node/enqueue.mjs"])
def test_the_raw_producer_examples_work_as_a_producer_user(server, secrets, worker, admin, example, tmp_path):
    """docs/PRODUCERS.md's examples push onto the producer's own list and write nothing else of kombu's."""
    request = ForecastRequest.from_frame(window(start=120), pred_len=4, series_id="raw-example")
    request_file = tmp_path / "request.json"
    request_file.write_text(request.model_dump_json(exclude_none=True))
    job_id = f"alpha:{uuid.uuid4()}"
    command = ["sh" if example.endswith(".sh") else "node", str(REPO_ROOT / "examples" / example), str(request_file)]
    variables = {
        "KRONOS_BROKER_URL": url(server, secrets, "alpha", 0),
        "KRONOS_QUEUE": queue_of("alpha"),
        "KRONOS_JOB_ID": job_id,
        "KRONOS_WAIT_SECONDS": "60",
    }
    before = logged_denials(admin)
    completed = subprocess.run(command, env={**os.environ, **variables}, capture_output=True, text=True,
                               timeout=120)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["result"]["job_id"] == job_id
    assert [denial for denial in logged_denials(admin) - before if denial[0] == "alpha"] == []


# --- finding 10: the monitor watches, the operator controls -------------------------------------------------


def test_the_monitor_reads_depths_never_payloads(server, secrets, admin):
    queue = queue_of("alpha")
    with connect(server, secrets, redis_acl.MONITOR_USER) as monitor, probing(admin, redis_acl.MONITOR_USER):
        for key in (queue, f"{queue}\x06\x165", DEAD_LETTER_KEY):
            assert not refused(monitor, "LLEN", key), key
            for read in (("LRANGE", key, 0, -1), ("LINDEX", key, 0), ("LPOS", key, "x")):
                assert refused(monitor, *read), read
        for read in (("HGETALL", "unacked"), ("HVALS", "unacked"), ("ZRANGE", "unacked_index", 0, -1)):
            assert refused(monitor, *read), read


def test_only_the_operator_controls_or_inspects_workers(server, secrets, env, clients, admin, admin_results, worker):
    """Celery's control channel carries both: `inspect scheduled` answers with the jobs' arguments, and any
    command sent on it (shutdown, revoke, kronos_load_model) reaches every worker."""
    request = ForecastRequest.from_frame(window(start=400), pred_len=4, series_id="alpha-held").model_dump(mode="json")
    held = clients["alpha"].app.send_task(FORECAST_TASK, args=[request], task_id=f"alpha:{uuid.uuid4()}",
                                          queue=queue_of("alpha"), priority=5, countdown=20)  # fmt: skip
    celery = ("-m", "celery", "-A", "tasks.app")
    monitor_env = role_env(env, server, secrets, redis_acl.MONITOR_USER)
    with probing(admin, redis_acl.MONITOR_USER):
        for command in (("inspect", "scheduled"), ("control", "revoke", f"beta:{uuid.uuid4()}")):
            denied = run_python(monitor_env, *celery, *command, "--timeout", "5")
            assert denied.returncode != 0 and held.id not in denied.stdout, command
            assert "no permissions" in denied.stdout + denied.stderr, command
        with connect(server, secrets, redis_acl.MONITOR_USER) as monitor:
            assert refused(monitor, "PUBLISH", "/0.celery.pidbox", "{}")
    operator_env = role_env(env, server, secrets, redis_acl.OPERATOR_USER)
    scheduled = run_python(operator_env, *celery, "inspect", "scheduled", "--timeout", "5")
    assert scheduled.returncode == 0 and "OK" in scheduled.stdout, scheduled.stdout + scheduled.stderr
    # the delayed job waits in Redis, not in the worker (worker/delayed.py): no inspect shows its arguments
    assert held.id not in scheduled.stdout and admin.zcard(DELAYED_KEY) >= 1
    pinged = run_python(operator_env, *celery, "inspect", "ping", "--timeout", "5")
    assert pinged.returncode == 0 and "pong" in pinged.stdout, pinged.stdout + pinged.stderr
    stored = f"celery-task-meta-{held.id}"

    def held_job_succeeded() -> bool:
        return json.loads(admin_results.get(stored) or "{}").get("status") == "SUCCESS"

    wait_for(held_job_succeeded, timeout=60, what="the held job to run: the worker was left alone")
    with connect(server, secrets, redis_acl.OPERATOR_USER) as operator, probing(admin, redis_acl.OPERATOR_USER):
        for command in (("LPUSH", queue_of("alpha"), "x"), ("LRANGE", queue_of("alpha"), 0, -1),
                        ("HGETALL", "unacked"), ("DEL", queue_of("alpha")), ("FLUSHALL",), ("KEYS", "*")):  # fmt: skip
            assert refused(operator, *command), command
        operator.execute_command("SELECT", 1)
        assert refused(operator, "GET", f"celery-task-meta-{held.id}")


def test_only_the_operator_swaps_the_served_model(server, secrets, env, admin, worker):
    """kronos_load_model (python -m tasks.control roll) changes what every producer's jobs run on."""
    roll = ("-m", "tasks.control", "roll", "--model", MODEL, "--predictor", str(kc.PARITY / "predictor"),
            "--wait", "--timeout", "60", "--json")  # fmt: skip

    def model_updates() -> list:
        return [json.loads(beat).get("model_update") for beat in admin.hvals("kronos:workers")]

    before = model_updates()
    with probing(admin, redis_acl.MONITOR_USER):
        refused_roll = run_python(role_env(env, server, secrets, redis_acl.MONITOR_USER), *roll)
    assert refused_roll.returncode != 0 and "no permissions" in refused_roll.stderr, refused_roll.stderr[-2000:]
    assert model_updates() == before
    rolled = run_python(role_env(env, server, secrets, redis_acl.OPERATOR_USER), *roll, timeout=120)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert [outcome["state"] for outcome in json.loads(rolled.stdout)] == ["serving"]


def test_no_legitimate_use_was_refused(admin):
    """Runs last: every ACL denial Redis logged came from the probes above, none from the roles' own work."""
    denials = logged_denials(admin)
    by_roles = [denial for denial in denials if denial[0] in redis_acl.ROLE_USERS and denial not in PROBED]
    assert by_roles == [], sorted(by_roles)
    probing_users = {"alpha", redis_acl.MONITOR_USER, redis_acl.OPERATOR_USER}
    assert {user for user, *_ in denials} <= probing_users, denials


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
