"""End to end through the queue: real redis-server, real `celery -A worker.app worker` processes, Kronos-small.

A Kronos-small-geometry checkpoint with random weights (fixed seed, Hugging Face layout, marked UNTRAINED) is
written to a temporary directory and served by the workers. Jobs are real ForecastRequests on the real
5-minute candles, sent with tasks/producer.py's submit (the path KronosClient uses, minus its duplicate check);
one listener thread in this process takes every result as Redis publishes it, exactly as KronosClient's wait
does, and notes when it arrived.

Per job: latency = arrival of the result here - the moment before submit. The worker's ForecastResult timings
split it into queue_wait (send to start in the worker), preprocess, batch_wait, inference; result store = arrival
here - the result's finished_at (Celery's bookkeeping, the JSON, the Redis SET and PUBLISH, the delivery);
other = what is left (building the result, the send itself). One host, one clock.

Parts:
- queue overhead: one worker with KRONOS_MAX_BATCH_SIZE=1, one job at a time, alternating with the same job
  run by KronosEngine directly in this process on the same checkpoint and thread count;
  overhead = median(latency - direct engine seconds) / median(direct engine seconds), over the pairs during
  which no other job took a core (see overhead_summary); beside it the worker's own split, latency - inference;
- load: 1 and 2 worker processes (the cores split between them), KRONOS_MAX_BATCH_SIZE at its default 16:
  a burst measures saturation throughput, then Poisson arrivals at 25/50/90 % of the single-worker
  saturation throughput and an open-loop overload at 200 %: jobs/s, p50/p95/p99 latency and its split;
- memory: RSS of a real worker process after loading the model and after serving.

Contention: this machine may be shared. For every segment the CPU time of the whole machine (/proc/stat) is
compared with that of the processes started here (workers, Redis, this one): `foreign_cores` is how many cores
other jobs used on average.
"""

import json
import os
import random
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from bench import engine_bench
from bench.harness import RedisServer, WorkerProcess, proc_status_kib, producer_app, worker_env
from model import KronosEngine
from model.kronos import KronosPredictor, KronosTokenizer
from schemas import ForecastRequest, ForecastResult
from tasks.producer import submit
from worker.jobs import series_input

RESULT_PATTERN = "celery-task-meta-*"
LOAD_JOB = (256, 30)  # lookback, pred_len of every load-run job
OVERHEAD_JOBS = {"short": (256, 30), "long": (392, 120)}  # the second is the engine benchmark's 1x392
LOAD_FRACTIONS = (0.25, 0.5, 0.9)
OVERLOAD_FRACTION = 2.0
LOAD_BATCH_SIZE = 16  # the worker's default KRONOS_MAX_BATCH_SIZE
FOREIGN_CORES_CONTENDED = 0.25  # other processes using more than this many cores on average: contended
RESULT_TIMEOUT = 600.0
STAGES = ("queue_wait", "preprocess", "batch_wait", "inference", "result_store", "other")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Settings:
    quick: bool
    device: str
    dtype: str
    threads: int  # cores for the workers: one worker gets all, two split them

    @property
    def load_seconds(self) -> float:
        """Length of each steady offered-load run."""
        return 4.0 if self.quick else 30.0

    @property
    def overhead_jobs(self) -> int:
        return 3 if self.quick else 12

    @property
    def burst_jobs(self) -> int:
        return 8 if self.quick else 48


# ---- checkpoint and jobs -----------------------------------------------------------------------------------


def write_checkpoint(directory: Path, geometry: str = "kronos-small") -> tuple[Path, Path]:
    """Random-weight predictor and tokenizer in the published layout (config.json + model.safetensors)."""
    torch.manual_seed(engine_bench.SEED)
    modules = {
        "tokenizer": (KronosTokenizer(engine_bench.TOKENIZER), engine_bench.TOKENIZER),
        "predictor": (KronosPredictor(engine_bench.GEOMETRIES[geometry]), engine_bench.GEOMETRIES[geometry]),
    }
    for name, (module, config) in modules.items():
        path = directory / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(asdict(config), indent=2))
        save_file(module.state_dict(), path / "model.safetensors")
    # worker/lifecycle.py's marker: results then say synthetic_model=true
    (directory / "predictor" / "UNTRAINED").write_text("random weights from a fixed seed, for benchmarks\n")
    return directory / "predictor", directory / "tokenizer"


def make_requests(candles: pd.DataFrame, label: str, count: int, lookback: int, pred_len: int):
    """`count` jobs on windows of the real candles at seeded random offsets, default sampling (top_p 0.9)."""
    rng = random.Random(label)
    for i in range(count):
        start = rng.randrange(0, len(candles) - lookback)
        frame = candles.iloc[start : start + lookback].set_index("timestamps")
        yield ForecastRequest.from_frame(
            frame, series_id=f"{label}-{i}", job_id=f"{label}-{i}", pred_len=pred_len, freq="5min", seed=i
        )


# ---- measuring -----------------------------------------------------------------------------------------------


class ResultListener:
    """Every stored result, with the time it was published, from one pattern subscription in a thread."""

    def __init__(self, results_client):
        self._pubsub = results_client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(RESULT_PATTERN)
        self._arrived: dict[str, tuple[float, dict]] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            arrived = time.time()
            meta = json.loads(message["data"])
            if meta.get("status") in ("SUCCESS", "FAILURE"):
                with self._changed:
                    self._arrived.setdefault(meta["task_id"], (arrived, meta))
                    self._changed.notify_all()

    def wait(self, job_ids: list[str], timeout: float = RESULT_TIMEOUT) -> dict[str, tuple[float, dict]]:
        """(arrival time, stored meta) of each job; raises TimeoutError naming how many never arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: all(i in self._arrived for i in job_ids), timeout):
                missing = sum(i not in self._arrived for i in job_ids)
                raise TimeoutError(f"{missing} of {len(job_ids)} results did not arrive within {timeout:g} s")
            return {i: self._arrived[i] for i in job_ids}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()


class CpuMeter:
    """Cores used by other processes than `pids` between start() and stop(), from /proc/stat (all CPUs)."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    @staticmethod
    def _machine_busy_ticks() -> int:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def _own_ticks(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return total

    def __enter__(self) -> "CpuMeter":
        self._start = (time.monotonic(), self._machine_busy_ticks(), self._own_ticks())
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._start[0]
        busy = self._machine_busy_ticks() - self._start[1]
        own = self._own_ticks() - self._start[2]
        self.own_cores = own / CLOCK_TICKS / wall
        self.foreign_cores = max(0.0, (busy - own) / CLOCK_TICKS / wall)

    def report(self) -> dict:
        return {
            "own_cores": round(self.own_cores, 3),
            "foreign_cores": round(self.foreign_cores, 3),
            "contended": self.foreign_cores > FOREIGN_CORES_CONTENDED,
        }


def percentiles(values) -> dict:
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
    }


def job_record(sent_at: float, arrived: float, meta: dict) -> dict:
    """One finished job's latency and its split (seconds); `failed` for a stored error."""
    if meta["status"] != "SUCCESS":
        return {"failed": True, "latency": arrived - sent_at, "error": meta.get("result")}
    result = ForecastResult.model_validate(meta["result"])
    timings = result.timings
    stages = {
        "queue_wait": timings.queue_wait or 0.0,
        "preprocess": timings.preprocess,
        "batch_wait": timings.batch_wait,
        "inference": timings.inference,
        "result_store": arrived - result.finished_at.timestamp(),
    }
    latency = arrived - sent_at
    stages["other"] = latency - sum(stages.values())
    return {
        "failed": False,
        "latency": latency,
        **stages,
        "batch_size": result.batch_size,
        "worker": result.worker,
        "sent_at": sent_at,
        "arrived": arrived,
    }


def summarize(records: list[dict], offered_rate: float | None) -> dict:
    done = [r for r in records if not r["failed"]]
    span = max(r["arrived"] for r in done) - min(r["sent_at"] for r in done) if done else None
    return {
        "jobs": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "offered_jobs_per_second": offered_rate,
        "jobs_per_second": len(done) / span if span else None,
        "latency": percentiles(r["latency"] for r in done),
        "stages_mean": {stage: float(np.mean([r[stage] for r in done])) if done else None for stage in STAGES},
        "stages_p50": {stage: percentiles(r[stage] for r in done)["p50"] for stage in STAGES},
        "batch_size_mean": float(np.mean([r["batch_size"] for r in done])) if done else None,
        "jobs_per_worker": {w: sum(r["worker"] == w for r in done) for w in sorted({r["worker"] for r in done})},
    }


# ---- running -----------------------------------------------------------------------------------------------


class Stack:
    """Redis, the checkpoint and the producer side, shared by every worker configuration of a run."""

    def __init__(self, scratch: Path, settings: Settings):
        self.settings = settings
        self.server = RedisServer().start()
        self.predictor_dir, self.tokenizer_dir = write_checkpoint(scratch / "checkpoint")
        self.env = worker_env(
            dict(os.environ),
            KRONOS_BROKER_URL=self.server.url(0),
            KRONOS_RESULT_BACKEND=self.server.url(1),
            KRONOS_PREDICTOR=str(self.predictor_dir),
            KRONOS_TOKENIZER=str(self.tokenizer_dir),
            KRONOS_DEVICE=settings.device,
            KRONOS_DTYPE=settings.dtype,
            KRONOS_TEST_FAULTS="0",
            KRONOS_MIN_CANDLES="16",
            KRONOS_MAX_BATCH_WAIT_MS="20",  # the worker's default (the test harness sets 100)
            KRONOS_METRICS_PORT="0",
            PYTHONPATH=str(engine_bench.ROOT),
        )
        # served as deployed, decode step compiled at load like the direct engine (the test harness skips it)
        self.env.pop("TORCH_COMPILE_DISABLE", None)
        self.app = producer_app(self.env)
        self.results_client = self.server.client(1)
        self.listener = ResultListener(self.results_client)
        self.candles = engine_bench.load_candles()

    @contextmanager
    def workers(self, count: int, max_batch: int):
        threads = max(1, self.settings.threads // count)
        env = {**self.env, "KRONOS_MAX_BATCH_SIZE": str(max_batch), "KRONOS_TORCH_THREADS": str(threads)}
        with ExitStack() as stack:
            started = []
            for i in range(count):
                worker = WorkerProcess(env, name=f"bench{i}").start()
                stack.callback(worker.stop)
                started.append(worker)
            for worker in started:
                worker.wait_ready(timeout=180)
            yield started

    def meter(self, workers: list[WorkerProcess]) -> CpuMeter:
        return CpuMeter([w.process.pid for w in workers] + [self.server.process.pid, os.getpid()])

    def send(self, requests: list[ForecastRequest], rate: float | None, seed: int = 0) -> list[dict]:
        """Submit at Poisson arrivals of `rate` jobs/s (all at once when None); every job's record."""
        arrivals = random.Random(seed)
        sent_at = {}
        start = time.monotonic()
        due = 0.0
        for request in requests:
            if rate is not None:
                pause = start + due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                due += arrivals.expovariate(rate)
            sent_at[request.job_id] = time.time()
            submit(request, celery_app=self.app)
        arrived = self.listener.wait(list(sent_at))
        return [job_record(sent_at[i], *arrived[i]) for i in sent_at]

    def close(self) -> None:
        self.listener.close()
        self.results_client.close()
        self.app.close()
        self.server.close()


def worker_memory(worker: WorkerProcess) -> dict:
    pid = worker.process.pid
    return {"rss_mib": proc_status_kib(pid, "VmRSS") / 1024, "peak_rss_mib": proc_status_kib(pid, "VmHWM") / 1024}


def queue_overhead(stack: Stack, say) -> dict:
    """One worker, batch size 1, one job at a time, each job also run directly on an engine in this process."""
    settings = stack.settings
    torch.set_num_threads(settings.threads)
    engine = KronosEngine.load(
        str(stack.predictor_dir), str(stack.tokenizer_dir), device=settings.device, dtype=settings.dtype
    )
    out = {"worker_threads": settings.threads, "direct_threads": torch.get_num_threads(), "jobs": {}}
    with stack.workers(1, max_batch=1) as (worker,):
        out["worker_memory"] = {"after_load": worker_memory(worker)}
        for label, (lookback, pred_len) in OVERHEAD_JOBS.items():
            say(f"queue overhead: {label} jobs (lookback {lookback}, {pred_len} steps), queue vs direct")
            warmups = list(make_requests(stack.candles, f"warm-{label}", 2, lookback, pred_len))
            stack.send(warmups, rate=None)
            for request in warmups:
                engine.forecast([series_input(request)])
            pairs = []
            requests = make_requests(stack.candles, f"overhead-{label}", settings.overhead_jobs, lookback, pred_len)
            for request in requests:  # alternating, so that a drift of the machine reaches both sides
                with stack.meter([worker]) as meter:
                    [record] = stack.send([request], rate=None)
                    t0 = time.perf_counter()
                    engine.forecast([series_input(request)])
                    direct = time.perf_counter() - t0
                pairs.append({**record, "direct": direct, **meter.report()})
            out["jobs"][label] = {"lookback": lookback, "pred_len": pred_len, **overhead_summary(pairs)}
        out["worker_memory"]["after_serving"] = worker_memory(worker)
    return out


def overhead_summary(pairs: list[dict]) -> dict:
    """Queue overhead over the pairs (queue job, direct run) during which no other job took a core; over all
    pairs when fewer than 3 were quiet. Beside it, the worker's own split: latency - its inference time."""
    quiet = [p for p in pairs if not p["contended"]]
    used = quiet if len(quiet) >= 3 else pairs
    overhead = [p["latency"] - p["direct"] for p in used]
    direct = [p["direct"] for p in used]
    outside_inference = [p["latency"] - p["inference"] for p in used]
    return {
        "jobs": len(pairs),
        "quiet_pairs": len(quiet),
        "pairs_used": "quiet" if used is quiet else "all (fewer than 3 quiet pairs)",
        "direct_engine_seconds": percentiles(direct),
        "queue_latency_seconds": percentiles(p["latency"] for p in used),
        "worker_inference_seconds": percentiles(p["inference"] for p in used),
        "overhead_seconds": percentiles(overhead),
        "overhead_percent_of_inference": 100 * float(np.median(overhead)) / float(np.median(direct)),
        "outside_inference_seconds": percentiles(outside_inference),
        "outside_inference_percent": 100
        * float(np.median(outside_inference))
        / float(np.median([p["inference"] for p in used])),
        "stages_mean": summarize(used, None)["stages_mean"],
        "foreign_cores_mean": float(np.mean([p["foreign_cores"] for p in pairs])),
    }


def load_runs(stack: Stack, workers: int, single_worker_capacity: float | None, say) -> dict:
    """Saturation throughput from a burst, then the offered loads (relative to the single-worker capacity)."""
    settings = stack.settings
    (lookback, pred_len) = LOAD_JOB
    out = {"workers": workers, "threads_per_worker": max(1, settings.threads // workers), "runs": []}
    with stack.workers(workers, max_batch=LOAD_BATCH_SIZE) as started:
        out["worker_memory_after_load"] = [worker_memory(w) for w in started]
        label = f"w{workers}"
        stack.send(list(make_requests(stack.candles, f"{label}-warm", 2 * workers, lookback, pred_len)), rate=None)
        say(f"{workers} worker(s): burst of {settings.burst_jobs} jobs (saturation throughput)")
        with stack.meter(started) as meter:
            burst = stack.send(
                list(make_requests(stack.candles, f"{label}-burst", settings.burst_jobs, *LOAD_JOB)), None
            )
        out["saturation"] = {**summarize(burst, None), "cpu": meter.report()}
        capacity = single_worker_capacity or out["saturation"]["jobs_per_second"]
        fractions = (*LOAD_FRACTIONS, OVERLOAD_FRACTION)
        for fraction in fractions:
            rate = fraction * capacity
            count = max(4, round(rate * settings.load_seconds))
            say(f"{workers} worker(s): {count} jobs at {rate:.2f} jobs/s ({fraction:.0%} of 1-worker capacity)")
            requests = list(make_requests(stack.candles, f"{label}-load{fraction}", count, lookback, pred_len))
            with stack.meter(started) as meter:
                records = stack.send(requests, rate, seed=workers)
            out["runs"].append({"fraction_of_capacity": fraction, **summarize(records, rate), "cpu": meter.report()})
        out["worker_memory_after_serving"] = [worker_memory(w) for w in started]
    return out


def run(quick: bool, device: str, dtype: str, threads: int, say) -> dict:
    settings = Settings(quick, device, dtype, threads)
    with tempfile.TemporaryDirectory(prefix="kronos-bench-") as scratch:
        stack = Stack(Path(scratch), settings)
        try:
            report = {
                "settings": asdict(settings),
                "job": {"lookback": LOAD_JOB[0], "pred_len": LOAD_JOB[1], "sample_count": 1, "sampling": "top_p 0.9"},
                "model": "kronos-small geometry, random weights (torch seed "
                f"{engine_bench.SEED}), written as a checkpoint and loaded by the workers",
                "how": __doc__.split("\n\n", 1)[1],
            }
            report["queue_overhead"] = queue_overhead(stack, say)
            report["load"] = []
            for workers in (1, 2):
                capacity = report["load"][0]["saturation"]["jobs_per_second"] if report["load"] else None
                report["load"].append(load_runs(stack, workers, capacity, say))
        finally:
            stack.close()
    return report
