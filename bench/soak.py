"""Soak run: thousands of jobs through two worker processes while a chaos loop breaks things.

    python -m bench.soak [--jobs 2000] [--rate 25] [--chaos-every 8] [--timeouts aggressive|default]
                         [--out bench/results/soak_<timeouts>.json]

It starts its own redis-server (AOF on) and two `celery worker` processes serving the tiny fixture
checkpoints, submits jobs (unique ids and seeds) at a steady rate, and meanwhile, at random intervals, does
one of five things: SIGKILLs a worker, SIGTERMs one, restarts Redis (SHUTDOWN and start, AOF reloaded),
pauses every Redis client for 3 s (CLIENT PAUSE 3000) or cuts every client connection (CLIENT KILL TYPE
normal), restarting what it stopped. `--timeouts aggressive` runs the workers with a visibility timeout of
8 s and KRONOS_MAX_JOB_SECONDS=6; `default` leaves both at their defaults (a killed worker's jobs then come
back after the 1,260 s visibility timeout, so give --drain enough). Then it waits for every job and reports:

- submitted, completed, failed by code, lost (no final answer at the end: must be 0);
- changed (a final answer that changed after it was first read, polled every second from the start: must be 0);
- wrong (a SUCCESS whose forecast differs from the same request forecast alone in this process: must be 0);
- model runs per job, from each job's claim: jobs run more than once, each listed with its takeovers (a run
  that took over from a dead worker's lapsed lease; the only allowed cause);
- p50/p95 latency (submit to stored result), worker RSS at start and end, and whether every worker slot ends
  with a live, ready worker.

Reuses the test harness (tests/redis_server.py, tests/worker_process.py). Not part of CI.
"""

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from bench.harness import REPO, RedisServer, WorkerProcess, kronos_cases, rss_kib, worker_env
from schemas import ForecastRequest
from tasks.producer import submit
from worker.jobs import series_input

AGGRESSIVE = {"KRONOS_VISIBILITY_TIMEOUT": "8", "KRONOS_MAX_JOB_SECONDS": "6"}
CHAOS_ACTIONS = ("kill", "term", "redis", "pause", "client-kill")


class Soak:
    def __init__(self, args):
        self.args = args
        self.server = RedisServer(appendonly=True).start()
        timeouts = AGGRESSIVE if args.timeouts == "aggressive" else {}
        base = {k: v for k, v in os.environ.items() if k not in AGGRESSIVE}
        self.env = worker_env(
            base,
            KRONOS_BROKER_URL=self.server.url(0),
            KRONOS_RESULT_BACKEND=self.server.url(1),
            KRONOS_UNACKED_RESTORE_INTERVAL="2",
            KRONOS_TEST_FAULTS="0",
            KRONOS_METRICS_PORT="0",
            PYTHONPATH=str(REPO),
            **timeouts,
        )
        self.visibility = int(timeouts.get("KRONOS_VISIBILITY_TIMEOUT", 1260))
        self.app = Celery("soak")
        self.app.config_from_object("celeryconfig")
        self.app.conf.update(
            broker_url=self.env["KRONOS_BROKER_URL"],
            result_backend=self.env["KRONOS_RESULT_BACKEND"],
            broker_transport_options={
                **self.app.conf.broker_transport_options,
                "visibility_timeout": self.visibility,
            },
        )
        self.first_seen: dict[str, dict] = {}
        self.changed: set[str] = set()
        self.workers = [WorkerProcess(self.env, name=f"soak{i}").start() for i in range(2)]
        for worker in self.workers:
            worker.wait_ready()
        self.all_workers = list(self.workers)
        self.rss_start = [rss_kib(w.process.pid) for w in self.workers]
        self.submitted: dict[str, float] = {}
        self.events: list[str] = []
        self.stop = threading.Event()

    def requests(self) -> list[ForecastRequest]:
        candles = pd.read_csv(REPO / "tests/fixtures/data/kline_5min_2500.csv", parse_dates=["timestamps"])
        rng = random.Random(7)
        requests = []
        for i in range(self.args.jobs):
            start = rng.randrange(0, len(candles) - 200)
            frame = candles.iloc[start : start + rng.randrange(32, 160)]
            requests.append(ForecastRequest.from_frame(
                frame, series_id=f"soak-{i}", job_id=f"soak-{i}", pred_len=rng.randrange(4, 24), freq="5min", seed=i
            ))  # fmt: skip
        return requests

    def submit_all(self, requests: list[ForecastRequest]):
        interval = 1 / self.args.rate
        for request in requests:
            while True:
                try:
                    submit(request, celery_app=self.app)
                    break
                except (OperationalError, RedisError, RuntimeError, OSError) as exc:
                    self.events.append(f"{time.time():.1f} submit retry {request.job_id}: {type(exc).__name__}")
                    time.sleep(0.5)
            self.submitted[request.job_id] = time.time()
            time.sleep(interval)

    def chaos(self):
        rng = random.Random(11)
        # every fault kind once per round, in a random order: a run of a dozen events meets all five
        actions = (action for _ in iter(int, 1) for action in rng.sample(CHAOS_ACTIONS, len(CHAOS_ACTIONS)))
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.chaos_every):
            action = next(actions)
            index = rng.randrange(len(self.workers))
            try:
                self.break_something(action, index)
            except Exception as exc:  # Redis away mid-command: the soak goes on, the report lists it
                self.events.append(f"{time.time():.1f} {action} failed: {exc!r}")

    def break_something(self, action: str, index: int) -> None:
        if action in ("redis", "pause", "client-kill"):
            self.events.append(f"{time.time():.1f} {action}")
            if action == "redis":
                self.server.restart()
            else:
                with self.server.client(0) as client:
                    if action == "pause":
                        client.execute_command("CLIENT", "PAUSE", 3000)
                    else:
                        client.execute_command("CLIENT", "KILL", "TYPE", "normal")
            return
        victim = self.workers[index]
        self.events.append(f"{time.time():.1f} {action} {victim.name}")
        if action == "kill":
            victim.kill()
        else:
            victim.terminate()
            victim.wait_exit(self.visibility * 3)
        replacement = WorkerProcess(self.env, name=f"soak{index}").start()
        self.workers[index] = replacement
        self.all_workers.append(replacement)
        replacement.wait_ready()

    def watch(self):
        """Read every final answer once a second from the start: any that changes after it was read counts."""
        while not self.stop_watching.wait(1):
            try:
                current = {k: v for k, v in self.outcomes().items() if v["status"] in ("SUCCESS", "FAILURE")}
            except RedisError:
                continue
            for job_id, stored in current.items():
                if job_id in self.first_seen and self.first_seen[job_id] != stored:
                    self.changed.add(job_id)
                self.first_seen.setdefault(job_id, stored)

    def outcomes(self) -> dict[str, dict]:
        client = self.server.client(1)
        ids = list(self.submitted)
        found = {}
        for chunk in range(0, len(ids), 500):
            keys = [f"celery-task-meta-{i}" for i in ids[chunk : chunk + 500]]
            for job_id, raw in zip(ids[chunk : chunk + 500], client.mget(keys), strict=True):
                if raw:
                    found[job_id] = json.loads(raw)
        return found

    def run(self) -> dict:
        requests = self.requests()
        started = time.time()
        self.stop_watching = threading.Event()
        watcher = threading.Thread(target=self.watch, daemon=True)
        watcher.start()
        chaos = threading.Thread(target=self.chaos, daemon=True)
        chaos.start()
        self.submit_all(requests)
        self.stop.set()
        chaos.join()
        until = time.time() + self.args.drain
        while time.time() < until and len(self.first_seen) < len(self.submitted):
            time.sleep(1)
        time.sleep(2)  # one more look for late changes
        self.stop_watching.set()
        watcher.join()
        return self.report(requests, time.time() - started)

    def whereabouts(self, job_ids: set[str]) -> dict[str, str]:
        """For each job without an outcome: still queued, unacknowledged, or nowhere in Redis."""
        client = self.server.client(0)
        found = {}
        for key in client.scan_iter(_type="list"):
            for item in client.lrange(key, 0, -1):
                try:
                    job_id = json.loads(item).get("headers", {}).get("id")
                except (ValueError, AttributeError):
                    continue
                if job_id in job_ids:
                    found[job_id] = f"queued in {key.decode(errors='replace')!r}"
        for item in client.hvals("unacked"):
            job_id = json.loads(item)[0].get("headers", {}).get("id")
            if job_id in job_ids:
                found[job_id] = "unacked"
        return {job_id: found.get(job_id, "nowhere") for job_id in sorted(job_ids)}

    def wrong_answers(self, requests: list[ForecastRequest], outcomes: dict[str, dict]) -> list[str]:
        """SUCCESS answers that differ from the same request forecast alone, here, by the same checkpoints."""
        engine = kronos_cases.engine()
        wrong = []
        for request in requests:
            stored = outcomes.get(request.job_id)
            if stored is None or stored["status"] != "SUCCESS":
                continue
            alone = engine.forecast([series_input(request)])[0].mean["close"].to_numpy()
            if not np.allclose(stored["result"]["forecast"]["close"], alone, rtol=1e-5, atol=1e-6):
                wrong.append(request.job_id)
        return wrong

    def model_runs(self) -> dict[str, dict[str, int]]:
        """Each job's claim: how many runs it had and how many took over a lapsed lease."""
        client = self.server.client(1)
        with client.pipeline(transaction=False) as pipe:
            for job_id in self.submitted:
                pipe.hmget(f"kronos:claim:{job_id}", "runs", "takeovers")
            replies = pipe.execute()
        return {
            job_id: {"runs": int(runs or 0), "takeovers": int(takeovers or 0)}
            for job_id, (runs, takeovers) in zip(self.submitted, replies, strict=True)
        }

    def report(self, requests: list[ForecastRequest], seconds: float) -> dict:
        outcomes = self.first_seen
        latencies = []
        failed: dict[str, int] = {}
        for job_id, stored in outcomes.items():
            if stored["status"] == "SUCCESS":
                done = pd.Timestamp(stored["date_done"]).timestamp()
                latencies.append(done - self.submitted[job_id])
            else:
                code = stored["result"].get("exc_message", [{}])[0].get("code", stored["result"].get("exc_type"))
                failed[code] = failed.get(code, 0) + 1
        runs = self.model_runs()
        more_than_once = {job_id: claim for job_id, claim in runs.items() if claim["runs"] > 1}
        return {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "timeouts": self.args.timeouts,
            "seconds": round(seconds, 1),
            "submitted": len(self.submitted),
            "completed": sum(1 for o in outcomes.values() if o["status"] == "SUCCESS"),
            "failed_by_code": failed,
            "lost": len(self.submitted) - len(outcomes),
            "lost_whereabouts": self.whereabouts(set(self.submitted) - set(outcomes)),
            "changed_after_final": sorted(self.changed),
            "wrong_answers": self.wrong_answers(requests, outcomes),
            "jobs_run_more_than_once": more_than_once,
            "runs_more_than_once_without_takeover": sorted(
                job_id for job_id, claim in more_than_once.items() if claim["takeovers"] == 0
            ),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
            "worker_rss_kib_start": self.rss_start,
            "worker_rss_kib_end": [rss_kib(w.process.pid) for w in self.workers if w.process.poll() is None],
            "workers_alive_at_end": [w.process.poll() is None for w in self.workers],
            "chaos_events": [e for e in self.events if "submit retry" not in e],
            "submit_retries": sum(1 for e in self.events if "submit retry" in e),
        }

    def close(self):
        for worker in self.workers:
            worker.stop()
        self.app.close()
        self.server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=25, help="jobs submitted per second")
    parser.add_argument("--chaos-every", type=float, default=8, help="mean seconds between chaos events")
    parser.add_argument("--drain", type=float, default=180, help="seconds to wait for the last outcomes")
    parser.add_argument("--timeouts", choices=("aggressive", "default"), default="aggressive")
    parser.add_argument("--out", help="report file (default bench/results/soak_<timeouts>.json)")
    args = parser.parse_args()
    args.out = args.out or str(REPO / f"bench/results/soak_{args.timeouts}.json")
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    clean = not (report["lost"] or report["changed_after_final"] or report["wrong_answers"])
    return 0 if clean and all(report["workers_alive_at_end"]) else 1


if __name__ == "__main__":
    sys.exit(main())
