"""Soak run: thousands of jobs through two worker processes while a chaos loop breaks things.

    python -m bench.soak [--jobs 2000] [--rate 25] [--chaos-every 8] [--out bench/results/soak.json]

It starts its own redis-server (AOF on) and two `celery worker` processes serving the tiny fixture
checkpoints, submits jobs at a steady rate, and meanwhile, at random intervals, SIGKILLs a worker,
SIGTERMs one, or restarts Redis, restarting what it stopped. Then it waits for every job and reports:
submitted, completed, failed by code, lost (no outcome at the end: must be 0), duplicated (a stored
outcome that changed after it was first read, i.e. a second run replacing a first answer: must be 0),
re-executed (jobs that ran more than once, which at-least-once delivery allows and results hide),
p50/p95 latency (submit to stored result) and worker RSS at start and end. Reuses the test harness
(tests/redis_server.py, tests/worker_process.py). Not part of CI.
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

from bench.harness import REPO, RedisServer, WorkerProcess, rss_kib, worker_env
from schemas import ForecastRequest
from tasks.producer import submit

VISIBILITY = 10


class Soak:
    def __init__(self, args):
        self.args = args
        self.server = RedisServer(appendonly=True).start()
        self.env = worker_env(
            dict(os.environ),
            KRONOS_BROKER_URL=self.server.url(0),
            KRONOS_RESULT_BACKEND=self.server.url(1),
            KRONOS_MAX_JOB_SECONDS=str(VISIBILITY - 2),
            KRONOS_VISIBILITY_TIMEOUT=str(VISIBILITY),
            KRONOS_UNACKED_RESTORE_INTERVAL="2",
            KRONOS_TEST_FAULTS="0",
            KRONOS_METRICS_PORT="0",
            PYTHONPATH=str(REPO),
        )
        self.app = Celery("soak")
        self.app.config_from_object("celeryconfig")
        self.app.conf.update(
            broker_url=self.env["KRONOS_BROKER_URL"],
            result_backend=self.env["KRONOS_RESULT_BACKEND"],
            broker_transport_options={**self.app.conf.broker_transport_options, "visibility_timeout": VISIBILITY},
        )
        self.workers = [WorkerProcess(self.env, name=f"soak{i}").start() for i in range(2)]
        for worker in self.workers:
            worker.wait_ready()
        self.all_workers = list(self.workers)
        self.rss_start = [rss_kib(w.process.pid) for w in self.workers]
        self.submitted: dict[str, float] = {}
        self.events: list[str] = []
        self.stop = threading.Event()

    def requests(self):
        candles = pd.read_csv(REPO / "tests/fixtures/data/kline_5min_2500.csv", parse_dates=["timestamps"])
        rng = random.Random(7)
        for i in range(self.args.jobs):
            start = rng.randrange(0, len(candles) - 200)
            frame = candles.iloc[start : start + rng.randrange(32, 160)]
            yield ForecastRequest.from_frame(
                frame, series_id=f"soak-{i}", job_id=f"soak-{i}", pred_len=rng.randrange(4, 24), freq="5min", seed=i
            )

    def submit_all(self):
        interval = 1 / self.args.rate
        for request in self.requests():
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
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.chaos_every):
            action = rng.choice(["kill", "term", "redis"])
            index = rng.randrange(len(self.workers))
            if action == "redis":
                self.events.append(f"{time.time():.1f} restart redis")
                self.server.restart()
                continue
            victim = self.workers[index]
            self.events.append(f"{time.time():.1f} {action} {victim.name}")
            if action == "kill":
                victim.kill()
            else:
                victim.terminate()
                victim.wait_exit(VISIBILITY * 3)
            replacement = WorkerProcess(self.env, name=f"soak{index}").start()
            self.workers[index] = replacement
            self.all_workers.append(replacement)
            replacement.wait_ready()

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
        started = time.time()
        chaos = threading.Thread(target=self.chaos, daemon=True)
        chaos.start()
        self.submit_all()
        self.stop.set()
        chaos.join()
        first_seen: dict[str, dict] = {}
        changed = set()
        until = time.time() + self.args.drain
        while time.time() < until:
            try:
                current = {k: v for k, v in self.outcomes().items() if v["status"] in ("SUCCESS", "FAILURE")}
            except RedisError:
                time.sleep(1)
                continue
            for job_id, stored in current.items():
                if job_id in first_seen and first_seen[job_id] != stored:
                    changed.add(job_id)
                first_seen.setdefault(job_id, stored)
            if len(first_seen) == len(self.submitted):
                break
            time.sleep(1)
        return self.report(first_seen, changed, time.time() - started)

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

    def report(self, outcomes, changed, seconds) -> dict:
        latencies = []
        failed: dict[str, int] = {}
        for job_id, stored in outcomes.items():
            if stored["status"] == "SUCCESS":
                done = pd.Timestamp(stored["date_done"]).timestamp()
                latencies.append(done - self.submitted[job_id])
            else:
                code = stored["result"].get("exc_message", [{}])[0].get("code", stored["result"].get("exc_type"))
                failed[code] = failed.get(code, 0) + 1
        runs: dict[str, int] = {}
        for worker in self.all_workers:
            for line in worker.log().splitlines():
                if "succeeded in" in line and "kronos.forecast[" in line:
                    job_id = line.split("kronos.forecast[", 1)[1].split("]", 1)[0]
                    runs[job_id] = runs.get(job_id, 0) + 1
        return {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds": round(seconds, 1),
            "submitted": len(self.submitted),
            "completed": sum(1 for o in outcomes.values() if o["status"] == "SUCCESS"),
            "failed_by_code": failed,
            "lost": len(self.submitted) - len(outcomes),
            "lost_whereabouts": self.whereabouts(set(self.submitted) - set(outcomes)),
            "duplicated": len(changed),
            "re_executed": sum(1 for n in runs.values() if n > 1),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 3) if latencies else None,
            "worker_rss_kib_start": self.rss_start,
            "worker_rss_kib_end": [rss_kib(w.process.pid) for w in self.workers],
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
    parser.add_argument("--out", default=str(REPO / "bench/results/soak.json"))
    args = parser.parse_args()
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
