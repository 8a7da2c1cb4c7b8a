"""Model lifecycle and self-protection against a real redis-server and real worker processes: rolling model
updates, a failed update, the circuit breaker, and the batch limit under memory pressure."""

import json
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack

import kronos_cases as kc
import numpy as np
import pytest
from redis_server import RedisServer, free_port
from test_loading import (
    ABSENT_COMMIT,
    FIXED_TE_COMMIT,
    MAIN_COMMIT,
    PREDICTOR_REPO,
    TOKENIZER_REPO,
    build_hub_cache,
)
from test_reliability import job, outcome, producer, reliable_env, wait_for_outcomes, wait_until
from worker_process import REPO_ROOT, WorkerProcess

from schemas.heartbeat import HEARTBEAT_KEY
from tasks.keys import CLAIM_KEY_PREFIX
from tasks.producer import submit
from worker.memory import AdaptiveBatchLimit

pytestmark = pytest.mark.slow


def hub_env(server: RedisServer, cache_home, **overrides) -> dict[str, str]:
    """Workers serving TestOrg/Kronos-tiny from an offline Hub cache holding two revisions of it."""
    settings = {
        "KRONOS_PREDICTOR": PREDICTOR_REPO,
        "KRONOS_PREDICTOR_REVISION": MAIN_COMMIT,
        "KRONOS_TOKENIZER": TOKENIZER_REPO,
        "HF_HOME": str(cache_home),
        "HF_HUB_CACHE": str(cache_home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "KRONOS_METRICS_PORT": "0",
        "KRONOS_HEARTBEAT_INTERVAL": "1",
        "KRONOS_MAX_JOB_SECONDS": "30",
        "KRONOS_VISIBILITY_TIMEOUT": "60",
    }
    return reliable_env(server, **{**settings, **overrides})


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    build_hub_cache(home / "hub")
    return home


def roll(env: dict[str, str], revision: str, *extra: str) -> tuple[int, list[dict]]:
    done = subprocess.run(
        [sys.executable, "-m", "tasks.control", "roll", "--model", "kronos-small", "--revision", revision,
         "--wait", "--timeout", "60", "--json", *extra],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def heartbeat(server: RedisServer, worker: WorkerProcess) -> dict:
    name = next(n for n in server.client(0).hkeys(HEARTBEAT_KEY) if n.decode().startswith(worker.name[:-2]))
    return json.loads(server.client(0).hget(HEARTBEAT_KEY, name))


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def close_of(request, predictor: str) -> list[float]:
    series = kc.SeriesInput(
        candles=request.to_frame(), future_timestamps=request.resolved_future_timestamps(), seed=request.seed
    )
    return kc.engine(predictor).forecast([series])[0].mean["close"].tolist()


def test_rolling_update_across_two_workers_loses_no_job_and_results_name_their_revision(cache_home):
    with RedisServer() as server, ExitStack() as workers:  # both workers are stopped, whatever fails
        env = hub_env(server, cache_home)
        app = producer(env)
        first, second = WorkerProcess(env, name="roll-a"), WorkerProcess(env, name="roll-b")
        workers.callback(second.stop)
        workers.callback(first.stop)
        first.start(), second.start()  # loading in parallel
        first.wait_ready(), second.wait_ready()
        wait_until(lambda: server.client(0).hlen(HEARTBEAT_KEY) == 2, what="both heartbeats")

        requests, stop = [], threading.Event()

        def keep_submitting():
            i = 0
            while not stop.is_set() or i < 12:
                request = job(i % 100, job_id=f"flow-{i}", series_id=f"flow-{i}")
                submit(request, celery_app=app)
                requests.append(request)
                i += 1
                time.sleep(0.05)

        producing = threading.Thread(target=keep_submitting)
        producing.start()
        time.sleep(1)
        code, outcomes = roll(env, FIXED_TE_COMMIT)
        time.sleep(1)
        stop.set()
        producing.join()

        assert code == 0, outcomes
        assert [o["state"] for o in outcomes] == ["serving", "serving"], outcomes
        assert all(o["revision"] == FIXED_TE_COMMIT and o["previous_revision"] == MAIN_COMMIT for o in outcomes)
        stored = wait_for_outcomes(server, [r.job_id for r in requests], timeout=120)
        assert len(stored) == len(requests), "no job lost"
        # from the claims the workers keep in Redis, not from log lines that may not be flushed yet
        runs = {r.job_id: server.client(1).hget(CLAIM_KEY_PREFIX + r.job_id, "runs") for r in requests}
        assert all(count == b"1" for count in runs.values()), f"each job ran exactly once: {runs}"

        results = [stored[r.job_id]["result"] for r in requests]
        assert all(stored[r.job_id]["status"] == "SUCCESS" for r in requests)
        predictor_of = {MAIN_COMMIT: "predictor", FIXED_TE_COMMIT: "predictor-fixed-te"}
        for worker in {result["worker"] for result in results}:
            # per worker, in finishing order: the old revision, then (after its switch) only the new one
            revisions = [r["model_revision"] for r in sorted(results, key=lambda r: r["finished_at"])
                         if r["worker"] == worker]  # fmt: skip
            assert revisions == sorted(revisions, key=[MAIN_COMMIT, FIXED_TE_COMMIT].index), worker
        seen = {result["model_revision"] for result in results}
        assert seen == {MAIN_COMMIT, FIXED_TE_COMMIT}, "jobs flowed before and after the switch"
        for request, result in zip(requests[::7], results[::7], strict=True):  # the revision named computed it
            expected = close_of(request, predictor_of[result["model_revision"]])
            np.testing.assert_allclose(result["forecast"]["close"], expected, rtol=1e-5)
        for worker in (first, second):
            beat = heartbeat(server, worker)
            assert beat["model_revision"] == FIXED_TE_COMMIT and beat["model_update"]["state"] == "serving"

        # the revision policy: a pin the queue serves runs; a pin nobody serves fails MODEL_NOT_READY
        pinned_new = job(1, job_id="pinned-new", model_revision=FIXED_TE_COMMIT)
        assert submit(pinned_new, celery_app=app).get(timeout=60)["model_revision"] == FIXED_TE_COMMIT
        submit(job(2, job_id="pinned-old", model_revision=MAIN_COMMIT), celery_app=app)
        failed = wait_for_outcomes(server, ["pinned-old"], timeout=60)["pinned-old"]
        assert failed["status"] == "FAILURE" and failed["result"]["exc_message"][0]["code"] == "MODEL_NOT_READY"
        first.stop(), second.stop()
        app.close()


def test_failed_update_keeps_the_old_model_serving_and_says_why(cache_home):
    with RedisServer() as server:
        port = free_port()
        env = hub_env(server, cache_home, KRONOS_METRICS_PORT=str(port))
        app = producer(env)
        with WorkerProcess(env, name="stays") as worker:
            wait_until(lambda: server.client(0).hlen(HEARTBEAT_KEY) == 1, what="the heartbeat")
            code, outcomes = roll(env, ABSENT_COMMIT)
            assert code == 1
            [failed] = outcomes
            assert failed["state"] == "failed" and ABSENT_COMMIT in failed["error"], failed
            beat = heartbeat(server, worker)
            assert beat["ready"] and beat["model_revision"] == MAIN_COMMIT
            assert beat["model_update"]["state"] == "failed" and ABSENT_COMMIT in beat["model_update"]["error"]
            assert metric(port, 'kronos_model_updates_total{model="kronos-small",outcome="failed"') == 1
            result = submit(job(3, job_id="after-failed-update"), celery_app=app).get(timeout=60)
            assert result["model_revision"] == MAIN_COMMIT
            assert "still serving the previous model" in worker.log()
        app.close()


def test_persistent_fault_opens_the_circuit_other_worker_serves_and_it_closes_after_the_fix():
    with RedisServer() as server, ExitStack() as workers:  # every worker is stopped, whatever fails
        port = free_port()
        env = reliable_env(server, KRONOS_MAX_RETRIES="5", KRONOS_HEARTBEAT_INTERVAL="1")
        faulty_env = {**env, "KRONOS_TEST_FAULT_KEY": "fault:faulty", "KRONOS_CIRCUIT_FAILURES": "3",
                      "KRONOS_CIRCUIT_COOLDOWN": "2", "KRONOS_METRICS_PORT": str(port)}  # fmt: skip
        app = producer(env)
        workers.callback(app.close)
        client = server.client(0)
        client.set("fault:faulty", 1)
        faulty = workers.enter_context(WorkerProcess(faulty_env, name="faulty"))
        early = [job(i, job_id=f"early-{i}") for i in range(6)]
        for request in early:
            submit(request, celery_app=app)
        wait_until(lambda: "circuit open" in (heartbeat(server, faulty)["reason"] or ""), what="the circuit to open")
        assert not heartbeat(server, faulty)["ready"] and metric(port, "kronos_circuit_open") == 1

        healthy = workers.enter_context(WorkerProcess({**env, "KRONOS_METRICS_PORT": "0"}, name="healthy"))
        late = [job(i, job_id=f"late-{i}") for i in range(6, 12)]
        for request in late:
            submit(request, celery_app=app)
        stored = wait_for_outcomes(server, [r.job_id for r in early + late], timeout=90)
        assert all(stored.get(r.job_id, {}).get("status") == "SUCCESS" for r in early + late), stored
        assert all(stored[r.job_id]["result"]["worker"].startswith("healthy@") for r in early + late)

        client.delete("fault:faulty")  # the fix: the next probe passes and the worker consumes again
        wait_until(lambda: heartbeat(server, faulty)["ready"], timeout=30, what="the circuit to close")
        assert metric(port, "kronos_circuit_open") == 0
        healthy.stop()
        after = job(13, job_id="after-fix")
        assert submit(after, celery_app=app).get(timeout=60)["worker"].startswith("faulty@")
        assert "circuit closed" in faulty.log()
        # the consumer cancel and add (Celery control commands) and their replies are Celery's: nothing refused
        assert client.llen("kronos:poison") == 0


def test_out_of_memory_splits_the_batch_shrinks_the_limit_and_it_grows_back():
    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server, KRONOS_MAX_BATCH_WAIT_MS="300", KRONOS_BATCH_GROW_AFTER="5",
                           KRONOS_METRICS_PORT=str(port))  # fmt: skip
        app = producer(env)
        with WorkerProcess(env, name="pressed") as worker:
            pressed = [job(i, job_id=f"oom-{i}", series_id="fault:oom-above:2") for i in range(8)]
            for request in pressed:
                submit(request, celery_app=app)
            stored = wait_for_outcomes(server, [r.job_id for r in pressed], timeout=60)
            assert all(stored[r.job_id]["status"] == "SUCCESS" for r in pressed), stored
            assert all(stored[r.job_id]["result"]["batch_size"] <= 2 for r in pressed)
            assert metric(port, "kronos_oom_total") >= 1
            assert metric(port, "kronos_batch_limit") <= 2
            assert "batch limit lowered to" in worker.log()

            for i in range(30):  # pressure gone: successful batches double the limit back to the maximum
                submit(job(i, job_id=f"calm-{i}"), celery_app=app).get(timeout=30)
                if metric(port, "kronos_batch_limit") == 4:
                    break
            assert metric(port, "kronos_batch_limit") == 4
            assert "batch limit raised to 4" in worker.log()
        assert outcome(server, "calm-0")["status"] == "SUCCESS"
        app.close()


def test_batch_limit_halves_on_out_of_memory_and_doubles_after_a_run_of_successes():
    limit = AdaptiveBatchLimit(16, grow_after=3)
    limit.out_of_memory(16)
    limit.out_of_memory(5)  # a split half that still did not fit
    assert (limit.current, limit.out_of_memory_count) == (2, 2)
    for expected in (2, 2, 4, 4, 4, 8, 8, 8, 16, 16):
        limit.batch_succeeded()
        assert limit.current == expected
    limit.out_of_memory(1)
    assert limit.current == 1


def test_batch_limit_grows_back_at_once_when_free_memory_recovers():
    free = {"bytes": 1_000}
    limit = AdaptiveBatchLimit(16, grow_after=100, free_memory=lambda: free["bytes"])
    limit.out_of_memory(16)  # 1000 bytes free when it ran out
    assert limit.current == 8
    free["bytes"] = 1_200  # not yet recovered: no growth before 100 successes
    limit.batch_succeeded()
    assert limit.current == 8
    free["bytes"] = 1_600  # recovered (>= 1.5 x): the next success doubles the limit
    limit.batch_succeeded()
    assert limit.current == 16


def test_free_memory_of_a_cpu_worker_is_the_hosts_available_memory():
    import torch

    from worker.memory import free_memory_of

    available = free_memory_of(torch.device("cpu"))()
    assert available is not None and available > 0
