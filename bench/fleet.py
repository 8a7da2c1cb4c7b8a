"""An idle fleet: what N idle workers cost Redis, and how fast one of them takes a job (not part of the tests).

    python -m bench.fleet                       # 20 workers, 60 s idle, 100 jobs; ~8 min on 2 cores
    python -m bench.fleet --workers 5 --idle 10 --jobs 20      # a smoke run

One real redis-server and N real `celery -A worker.app worker` processes on the tiny test checkpoint, started as
the docs start them (mingle and gossip on), run twice in one go:
- announced: Redis announces list pushes (notify-keyspace-events Kl, as every Redis of this project is set up),
  and idle workers wait for them (worker/wakeup.py);
- polling: the same fleet on a Redis that announces nothing, so idle workers fall back to polling every
  KRONOS_POLL_INTERVAL_MS, which is what every idle worker did before the wake-ups.
For each: Redis's own CPU (INFO cpu) and commands (INFO stats, INFO commandstats) over the idle window, against
the same Redis with no worker at all measured first; the workers' CPU (/proc) over the same window; then jobs
sent one at a time, 100 ms apart, to the idle fleet: pickup latency = the result's queue_wait (the producer's
send to the worker starting the job: pop, admission, claim). The cost per idle worker is the fleet's minus the
empty Redis's, divided by N; times 500 for a fleet of 500.

Writes bench/results/fleet.json (or --out) and prints the table docs/BENCHMARKS.md quotes.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import REPO, RedisServer, WorkerProcess, code_version, cpu_model, kronos_cases, worker_env
from tasks.client import KronosClient

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EXTRAPOLATE_TO = 500


def redis_counters(server: RedisServer) -> dict[str, float]:
    with server.client(0) as admin:
        cpu, stats, commands = admin.info("cpu"), admin.info("stats"), admin.info("commandstats")
    counters = {"cpu_seconds": cpu["used_cpu_sys"] + cpu["used_cpu_user"],
                "commands": stats["total_commands_processed"]}  # fmt: skip
    counters |= {f"cmd:{name.removeprefix('cmdstat_')}": fields["calls"] for name, fields in commands.items()}
    return counters


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their threads so far (/proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def measure_idle(server: RedisServer, seconds: float, pids: list[int]) -> dict:
    before, workers_before, started = redis_counters(server), process_cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    after, workers_after = redis_counters(server), process_cpu_seconds(pids)
    wall = time.monotonic() - started
    rates = {key[4:]: (after[key] - before.get(key, 0)) / wall for key in after if key.startswith("cmd:")}
    return {
        "seconds": round(wall, 1),
        "redis_core_fraction": (after["cpu_seconds"] - before["cpu_seconds"]) / wall,
        "redis_commands_per_second": (after["commands"] - before["commands"]) / wall,
        "commands_per_second_by_name": {name: round(rate, 2) for name, rate in sorted(rates.items()) if rate > 0},
        "workers_core_fraction": (workers_after - workers_before) / wall,
    }


def pickups(client: KronosClient, jobs: int) -> list[float]:
    """Seconds from send to start of `jobs` jobs sent 100 ms apart to an idle fleet."""
    frame = kronos_cases.candles()
    sent = []
    for number in range(jobs):
        sent.append(client.submit(frame.iloc[number : number + 48], pred_len=4, seed=number))
        time.sleep(0.1)
    return [job.wait(timeout=120).timings.queue_wait for job in sent]


def run_fleet(mode: str, workers: int, idle_seconds: float, jobs: int) -> dict:
    with RedisServer() as server, ExitStack() as stack:
        if mode == "polling":
            with server.client(0) as admin:
                admin.config_set("notify-keyspace-events", "")
        empty = measure_idle(server, min(idle_seconds, 20), [])
        env = worker_env(dict(os.environ), KRONOS_BROKER_URL=server.url(0), KRONOS_RESULT_BACKEND=server.url(1),
                         PYTHONPATH=str(REPO), KRONOS_METRICS_PORT="0", KRONOS_TEST_FAULTS="0")  # fmt: skip
        fleet = [WorkerProcess(env, name=f"fleet-{number}", documented=True).start() for number in range(workers)]
        for worker in fleet:
            stack.callback(worker.stop)
        for worker in fleet:
            worker.wait_ready(timeout=600)
        time.sleep(10)  # past start-up: mingle, the first heartbeats, the subscription's probe
        idle = measure_idle(server, idle_seconds, [worker.process.pid for worker in fleet])
        client = stack.enter_context(KronosClient(server.url(0), server.url(1)))
        waits = sorted(pickups(client, jobs))
    redis_per_worker = max(0.0, idle["redis_core_fraction"] - empty["redis_core_fraction"]) / workers
    commands_per_worker = max(0.0, idle["redis_commands_per_second"] - empty["redis_commands_per_second"]) / workers
    p95 = waits[max(0, round(0.95 * len(waits)) - 1)]
    return {
        "mode": mode,
        "workers": workers,
        "empty_redis": empty,
        "idle": idle,
        "per_idle_worker": {"redis_core_fraction": redis_per_worker, "redis_commands_per_second": commands_per_worker},
        f"extrapolated_{EXTRAPOLATE_TO}_workers": {
            "redis_core_fraction": empty["redis_core_fraction"] + EXTRAPOLATE_TO * redis_per_worker,
            "redis_commands_per_second": empty["redis_commands_per_second"] + EXTRAPOLATE_TO * commands_per_worker,
        },
        "pickup_seconds": {"jobs": len(waits), "p50": statistics.median(waits), "p95": p95, "max": waits[-1]},
    }


def table(runs: list[dict]) -> str:
    rows = [
        "| idle workers wait by | Redis CPU, idle fleet (empty Redis) | Redis commands/s, idle fleet (empty) "
        f"| per idle worker: CPU, commands/s | {EXTRAPOLATE_TO} idle workers: Redis CPU | workers' own CPU, idle "
        "| pickup p50 / p95 / max |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        idle, empty, per = run["idle"], run["empty_redis"], run["per_idle_worker"]
        extrapolated, pickup = run[f"extrapolated_{EXTRAPOLATE_TO}_workers"], run["pickup_seconds"]
        rows.append(
            f"| {run['mode']} ({run['workers']} workers) | {100 * idle['redis_core_fraction']:.2f} % of a core "
            f"({100 * empty['redis_core_fraction']:.2f} %) | {idle['redis_commands_per_second']:.1f} "
            f"({empty['redis_commands_per_second']:.1f}) | {100 * per['redis_core_fraction']:.3f} %, "
            f"{per['redis_commands_per_second']:.2f} | {100 * extrapolated['redis_core_fraction']:.1f} % "
            f"| {100 * idle['workers_core_fraction']:.1f} % of a core | {1000 * pickup['p50']:.1f} / "
            f"{1000 * pickup['p95']:.1f} / {1000 * pickup['max']:.1f} ms |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window")
    parser.add_argument("--jobs", type=int, default=100, help="jobs sent one by one to the idle fleet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fleet.json")
    args = parser.parse_args(argv)
    runs = [run_fleet(mode, args.workers, args.idle, args.jobs) for mode in ("announced", "polling")]
    report = {
        "benchmark": "fleet",
        "command": "python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform()},
        "code": code_version(("schemas", "tasks", "worker", "celeryconfig.py")),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
