"""Exactly one final answer per job (real redis-server, real workers).

Each test stands for a way the delivery layer once broke that promise: a stored FAILURE replaced by later
writes, a redelivered job run again although its answer was stored, two copies of one job running side by
side after a connection loss, valid jobs failed by a short Redis restart, a reused job id answered with
another request's forecast, and a message delivered without an unacknowledged record.

How often the model ran is read from each worker's own /metrics (`kronos_batch_size_sum`: jobs its engine
ran), not from anything the claim code writes, so these tests also fail on code without claims.
"""

import json
import threading
import time
import urllib.request

import pytest
from redis_server import RedisServer, free_port
from test_reliability import job, outcome, producer, queued, reliable_env, wait_for_outcomes, wait_until
from worker_process import WorkerProcess

from schemas import ErrorCode, JobFailed, job_digest
from tasks.producer import submit

pytestmark = pytest.mark.slow

QUEUE = "kronos.kronos-small"
FINAL = ("SUCCESS", "FAILURE")


def engine_runs(port: int) -> float:
    """Jobs this worker's engine has run (the sum of its batch sizes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith("kronos_batch_size_sum{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class StateRecorder:
    """Every state the worker publishes for a job, in order (the channel of its result key)."""

    def __init__(self, server: RedisServer, job_id: str):
        self.states: list[str] = []
        self._pubsub = server.client(1).pubsub()
        self._pubsub.subscribe(f"celery-task-meta-{job_id}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except Exception:  # the server went away: the test's outcome checks decide
                return
            if message and message["type"] == "message":
                self.states.append(json.loads(message["data"])["status"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def priority_lists() -> list[str]:
    return [QUEUE, *(f"{QUEUE}\x06\x16{p}" for p in range(1, 10))]


def queued_message(server: RedisServer, request, app) -> bytes:
    """Send the job while no worker runs and return its raw envelope, left on the queue."""
    submit(request, celery_app=app)
    client = server.client(0)
    raw = next(filter(None, (client.lindex(queue, 0) for queue in priority_lists())))
    return raw


def test_a_stored_failure_is_never_replaced_by_the_batch_that_outlived_it():
    """KRONOS_MAX_JOB_SECONDS=1 and a job whose batch takes longer: its wait gives up (FAILURE TIMEOUT), and
    the batch's later progress must not replace that FAILURE."""
    with RedisServer() as server:
        env = reliable_env(server, KRONOS_MAX_JOB_SECONDS="1", KRONOS_VISIBILITY_TIMEOUT="10",
                           KRONOS_PROGRESS_INTERVAL="0.01")  # fmt: skip
        app = producer(env)
        request = job(1, pred_len=120, series_id="fault:sleep:1.5", sample_count=16)
        recorder = StateRecorder(server, request.job_id)
        with WorkerProcess(env, name="slow"):
            submit(request, celery_app=app)
            wait_until(lambda: (outcome(server, request.job_id) or {}).get("status") == "FAILURE", timeout=30,
                       what="the TIMEOUT failure")  # fmt: skip
            stored = outcome(server, request.job_id)
            time.sleep(4)  # the batch goes on for a while after the wait gave up
            assert outcome(server, request.job_id) == stored, "the FAILURE was replaced"
        recorder.close()
        assert stored["result"]["exc_message"][0]["code"] == "TIMEOUT"
        assert recorder.states[recorder.states.index("FAILURE") :] == ["FAILURE"], recorder.states
        app.close()


@pytest.mark.parametrize("final", ["SUCCESS", "FAILURE"])
def test_a_delivered_job_whose_final_answer_is_stored_is_acked_without_running(final):
    """The message of a job whose final answer is already stored (an earlier delivery's, the ack lost) is
    delivered: the model does not run, the answer does not change, nothing stays queued or unacked."""
    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server, KRONOS_METRICS_PORT=str(port))
        app = producer(env)
        request = job(2)
        queued_message(server, request, app)
        earlier = {
            "status": final,
            "result": {"job_id": request.job_id, "note": "an earlier delivery's answer"}
            if final == "SUCCESS"
            else {"exc_type": "JobFailed", "exc_module": "schemas.errors",
                  "exc_message": [{"code": "INTERNAL", "message": "earlier", "job_id": request.job_id}]},
            "traceback": None, "children": [], "date_done": "2026-12-01T00:00:00+00:00", "task_id": request.job_id,
        }  # fmt: skip
        server.client(1).set(f"celery-task-meta-{request.job_id}", json.dumps(earlier))
        with WorkerProcess(env, name="second"):
            wait_until(lambda: queued(server) == 0 and server.client(0).hlen("unacked") == 0, timeout=30,
                       what="the message to be consumed and acknowledged")  # fmt: skip
            time.sleep(1)
            assert engine_runs(port) == 0, "the model ran a job whose final answer was stored"
        assert outcome(server, request.job_id) == earlier
        app.close()


def test_a_lost_ack_redelivers_the_job_and_the_model_does_not_run_it_again():
    """The worker stores SUCCESS and dies before the ack; the sweep hands the job to a second worker,
    which acknowledges it without running the model."""
    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server)
        app = producer(env)
        request = job(3, series_id="fault:exit-after-result")
        with WorkerProcess(env, name="doomed") as doomed:
            submit(request, celery_app=app)
            assert doomed.wait_exit(60) == 17  # died after storing the result, before the ack
        first = outcome(server, request.job_id)
        assert first["status"] == "SUCCESS" and server.client(0).hlen("unacked") == 1
        with WorkerProcess({**env, "KRONOS_METRICS_PORT": str(port)}, name="second"):
            wait_until(lambda: server.client(0).hlen("unacked") == 0 and queued(server) == 0, timeout=40,
                       what="redelivery and ack")  # fmt: skip
            time.sleep(1)
            assert engine_runs(port) == 0, "the redelivered job ran the model again"
        assert outcome(server, request.job_id) == first
        app.close()


def test_after_a_connection_loss_the_restored_copy_does_not_run_beside_the_original():
    """CLIENT KILL while a job runs: the worker restores what it held and fetches it again; the copy must not
    start while the original still runs, and the model runs the job once."""
    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server, KRONOS_METRICS_PORT=str(port), KRONOS_MAX_JOB_SECONDS="8",
                           KRONOS_VISIBILITY_TIMEOUT="20")  # fmt: skip
        app = producer(env)
        request = job(4, series_id="fault:sleep:3")
        with WorkerProcess(env, name="cut"):
            submit(request, celery_app=app)
            wait_until(lambda: (outcome(server, request.job_id) or {}).get("status") == "STARTED", timeout=20,
                       what="the job to start")  # fmt: skip
            server.client(0).execute_command("CLIENT", "KILL", "TYPE", "normal")
            final = wait_for_outcomes(server, [request.job_id], timeout=60)
            assert final[request.job_id]["status"] == "SUCCESS"
            wait_until(lambda: queued(server) == 0 and server.client(0).hlen("unacked") == 0, timeout=40,
                       what="every copy to be consumed")  # fmt: skip
            time.sleep(4)  # a copy started late would still be running
            assert engine_runs(port) == 1, "two copies of the job ran the model"
        app.close()


RUNNING_OR_DONE = ("STARTED", "PROGRESS", "SUCCESS")


@pytest.mark.parametrize("outage", [2, 3])
def test_a_short_redis_restart_fails_no_valid_job(outage):
    """Redis goes away for a few seconds while jobs run (progress being written), start (STARTED) and finish
    (their answers): with the aggressive timeouts of the chaos runs (a job may wait 6 s for its batch, which
    takes about 2.5 s) every job still ends in SUCCESS, none in TIMEOUT or a store error."""
    with RedisServer(appendonly=True) as server:
        env = reliable_env(server, KRONOS_MAX_JOB_SECONDS="6", KRONOS_VISIBILITY_TIMEOUT="8",
                           KRONOS_PROGRESS_INTERVAL="0.01", KRONOS_CONCURRENCY="2", KRONOS_MAX_BATCH_SIZE="2",
                           KRONOS_PREFETCH_MULTIPLIER="2")  # fmt: skip
        app = producer(env)
        # two jobs run at a time, as one batch of about 2.5 s: well within the 6 s, unless Redis blocks it
        requests = [job(i, pred_len=60, sample_count=4, series_id=f"fault:sleep:{1 + i % 2}") for i in range(10)]
        with WorkerProcess(env, name="steady"):
            for request in requests:
                submit(request, celery_app=app)
            # running: its jobs sleep (fault:sleep) before the engine, whose PROGRESS lasts a fraction of a second
            # and may come and go between two polls; the batches after it run during the outage either way
            wait_until(lambda: (outcome(server, requests[0].job_id) or {}).get("status") in RUNNING_OR_DONE,
                       timeout=20, what="the first batch to run")  # fmt: skip
            server.stop()
            time.sleep(outage)
            server.start()
            final = wait_for_outcomes(server, [r.job_id for r in requests], timeout=120)
        failed = {i: o["result"] for i, o in final.items() if o["status"] != "SUCCESS"}
        assert not failed, failed
        assert len(final) == len(requests)
        app.close()


def test_a_reused_job_id_never_returns_another_requests_answer():
    """A different request sent under the id of a finished job is refused with JOB_ID_CONFLICT where the docs
    say (kronos:conflict:<id>), never run, and the finished job's answer stays; the same request again is the
    same job. The Python client refuses the conflicting request at submit."""
    from tasks.client import KronosClient

    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server, KRONOS_METRICS_PORT=str(port))
        app = producer(env)
        first = job(5, job_id="report-1")
        other = job(6, job_id="report-1")
        with WorkerProcess(env, name="ids"):
            assert submit(first, celery_app=app).get(timeout=30)["job_id"] == "report-1"
            stored = outcome(server, "report-1")
            assert engine_runs(port) == 1
            # the answer names the request it answers, and the precision that computed it
            assert stored["result"]["request_digest"] == job_digest(first)
            assert stored["result"]["precision"] == "float32"
            submit(other, celery_app=app)  # a raw producer, no job record
            wait_until(lambda: queued(server) == 0 and server.client(0).hlen("unacked") == 0, timeout=30,
                       what="the second message to be consumed")  # fmt: skip
            time.sleep(1)
            assert engine_runs(port) == 1, "the conflicting request ran"
            assert outcome(server, "report-1") == stored
            conflict = json.loads(server.client(1).get("kronos:conflict:report-1"))
            assert conflict["code"] == ErrorCode.JOB_ID_CONFLICT

            with KronosClient(server.url(0), server.url(1)) as client:
                frame = first.to_frame()
                same = client.submit(frame, pred_len=first.pred_len, seed=first.seed, series_id=first.series_id,
                                     job_id="report-2", freq="5min")  # fmt: skip
                again = client.submit(frame, pred_len=first.pred_len, seed=first.seed, series_id=first.series_id,
                                      job_id="report-2", freq="5min")  # fmt: skip
                assert again.duplicate and again.id == same.id, "the same request again is the same job"
                from tasks.client import JobIdConflict

                with pytest.raises(JobIdConflict):
                    client.submit(frame, pred_len=first.pred_len, seed=first.seed + 1, series_id=first.series_id,
                                  job_id="report-2", freq="5min")  # fmt: skip
                same.wait(timeout=30)
            runs = engine_runs(port)

            # a FAILURE is final too: a valid request under a failed job's id is not run
            bad = job(7, job_id="report-3", top_p=0.9).model_dump(mode="json")
            bad["candles"]["close"][3] = -1.0
            with pytest.raises(JobFailed):
                app.send_task("kronos.forecast", args=[bad], task_id="report-3", queue=QUEUE).get(timeout=30)
            failed = outcome(server, "report-3")
            submit(job(8, job_id="report-3"), celery_app=app)
            wait_until(lambda: queued(server) == 0 and server.client(0).hlen("unacked") == 0, timeout=30,
                       what="the third message to be consumed")  # fmt: skip
            time.sleep(1)
            assert outcome(server, "report-3") == failed
            assert engine_runs(port) == runs
        app.close()


def test_a_message_the_pop_cannot_record_is_refused_not_delivered():
    """An envelope whose delivery_tag is a number cannot be recorded as unacknowledged: delivered, it would
    be lost with a worker that dies. It goes to the poison list and never runs."""
    with RedisServer() as server:
        port = free_port()
        env = reliable_env(server, KRONOS_METRICS_PORT=str(port))
        app = producer(env)
        raw = json.loads(queued_message(server, job(9, job_id="numeric-tag"), app))
        server.client(0).delete(*priority_lists())
        raw["properties"]["delivery_tag"] = 12345
        server.client(0).lpush(QUEUE, json.dumps(raw))
        with WorkerProcess(env, name="strict"):
            assert submit(job(10, job_id="after-it"), celery_app=app).get(timeout=30)["job_id"] == "after-it"
            wait_until(lambda: queued(server) == 0, timeout=20, what="the queue to drain")
            time.sleep(1)
            assert engine_runs(port) == 1, "the unrecordable message ran"
        assert outcome(server, "numeric-tag") is None
        poison = [json.loads(item) for item in server.client(0).lrange("kronos:poison", 0, -1)]
        assert any("numeric-tag" in json.dumps(item) for item in poison), poison
        app.close()
