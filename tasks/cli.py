"""`kronos-worker` (or `python -m tasks.cli`): submit forecasts, follow them, check the fleet, plot a result,
print the wire schemas, start workers or the demo.

Every command but `worker` takes --json for machine-readable output on stdout. Errors are one line on
stderr, never a traceback, and the exit status tells their kind (EXIT_* below). Redis comes from
KRONOS_BROKER_URL and KRONOS_RESULT_BACKEND, like every other process (docs/CONFIGURATION.md).
The worker and demo commands run `python -m worker.launch` / `python -m worker.demo` in place of this
process: the worker package needs torch, which this one never imports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from schemas import JobFailed, WorkerHeartbeat, json_schemas
from schemas.result import ForecastResult
from tasks.client import (
    CandleDataError,
    ForecastJob,
    JobNotFound,
    JobStatus,
    JobTimeout,
    KronosClient,
    RedisUnavailable,
    read_candles_csv,
)
from tasks.plot import HISTORY_CANDLES, UNTRAINED_LABEL, PlotUnavailable, plot_forecast
from tasks.purge import purge
from tasks.routing import serving_queues
from tasks.settings import SettingsError

PROG = "kronos-worker"
EXIT_JOB_FAILED = 1  # also: `status` found no ready worker
EXIT_USAGE = 2  # bad arguments or input: the CSV, the request, a KRONOS_* variable
EXIT_NOT_FOUND = 3  # unknown or expired job id
EXIT_TIMEOUT = 4  # the job did not finish within --timeout
EXIT_REDIS_UNAVAILABLE = 5
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a process killed by SIGPIPE

_EXIT_CODES: dict[type[Exception], int] = {
    JobNotFound: EXIT_NOT_FOUND,
    RedisUnavailable: EXIT_REDIS_UNAVAILABLE,
    CandleDataError: EXIT_USAGE,
    SettingsError: EXIT_USAGE,
    PlotUnavailable: EXIT_USAGE,
}
# Volumes and turnover read better as whole numbers; prices keep four decimals.
_WHOLE_NUMBER_COLUMNS = ("volume", "amount")


class UsageError(Exception):
    """A mistake in what the user asked for; the message says which."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # One line, like every other error of this command, instead of argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    try:
        return args.run(args)
    except JobFailed as failure:
        error = failure.error
        if args.json:
            _print_json({"job_id": error.job_id, "state": "FAILURE", "error": error.model_dump(mode="json")})
        return _fail(f"job {error.job_id} failed: {error.code}: {error.message}", EXIT_JOB_FAILED)
    except JobTimeout as timeout:
        if args.json:
            _print_json(timeout.status.to_json())
        return _fail(str(timeout), EXIT_TIMEOUT)
    except UsageError as mistake:
        return _fail(str(mistake), EXIT_USAGE)
    except tuple(_EXIT_CODES) as problem:
        return _fail(str(problem), next(code for kind, code in _EXIT_CODES.items() if isinstance(problem, kind)))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Submit Kronos forecasts, follow them, check the workers, plot a result, print the wire "
        "schemas, start workers or the demo. Redis: KRONOS_BROKER_URL, KRONOS_RESULT_BACKEND.",
        epilog=f"exit status: 0 ok, {EXIT_JOB_FAILED} the job failed (status: no worker ready), {EXIT_USAGE} bad "
        f"usage or input, {EXIT_NOT_FOUND} unknown or expired job id, {EXIT_TIMEOUT} timed out, "
        f"{EXIT_REDIS_UNAVAILABLE} Redis unreachable",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_option = _Parser(add_help=False)
    json_option.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    waiting = _Parser(add_help=False)
    waiting.add_argument("--timeout", type=_positive(float), help="seconds to wait at most (default: no limit)")
    waiting.add_argument("--progress", action="store_true", help="draw a progress bar on stderr while waiting")

    submit = commands.add_parser("submit", parents=[json_option, waiting], help="enqueue a forecast of a candle CSV")
    submit.add_argument("file", metavar="FILE.csv", help="timestamps, open, high, low, close[, volume, amount]")
    submit.add_argument("--pred-len", type=_positive(int), default=24, help="steps to forecast (default 24)")
    submit.add_argument("--freq", help="pandas offset alias such as 5min or 1h (default: inferred)")
    submit.add_argument("--sample-count", type=_positive(int), help="sampled paths averaged (default 1)")
    submit.add_argument("--quantiles", type=_quantiles, help="e.g. 0.1,0.5,0.9 (needs --sample-count > 1)")
    submit.add_argument("--seed", type=int, help="for reproducible sampling")
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-k", type=int, help="1 gives greedy decoding")
    submit.add_argument("--top-p", type=float)
    submit.add_argument("--model", help="served model (default kronos-small)")
    submit.add_argument(
        "--priority", type=int, choices=range(10), metavar="0-9", help="1 first, 9 last; 5 is the default, 0 the same"
    )
    submit.add_argument("--series-id", help="default: the file name without .csv")
    submit.add_argument("--job-id", help="your own id: submitting it again does not create a second job")
    submit.add_argument("--wait", action="store_true", help="wait for the result and print it")
    submit.set_defaults(run=run_submit)

    result = commands.add_parser("result", parents=[json_option, waiting], help="a job's state or result")
    result.add_argument("job_id", metavar="JOB_ID")
    result.add_argument("--wait", action="store_true", help="wait until the job finishes")
    result.set_defaults(run=run_result)

    status = commands.add_parser(
        "status", parents=[json_option], help="workers online and jobs waiting; fails when no worker is ready"
    )
    status.set_defaults(run=run_status)

    plot = commands.add_parser("plot", parents=[json_option], help="draw a job's forecast after its candles")
    plot.add_argument("job_id", metavar="JOB_ID")
    plot.add_argument("--csv", required=True, metavar="FILE.csv", help="the candles the job was submitted with")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png")
    plot.add_argument("--history", type=_positive(int), default=HISTORY_CANDLES, help="candles shown before")
    plot.add_argument("--timeout", type=_positive(float), help="seconds to wait for an unfinished job")
    plot.set_defaults(run=run_plot)

    schema = commands.add_parser(
        "schema", parents=[json_option], help="JSON Schema of the request, result or error (always JSON)"
    )
    schema.add_argument("name", nargs="?", choices=sorted(json_schemas()), help="default: all three")
    schema.set_defaults(run=run_schema)

    purge = commands.add_parser(
        "purge", parents=[json_option], help="take every queued job off its queues, answering each with PURGED"
    )
    purge.add_argument("--model", action="append", help="only this served model's queues (repeatable)")
    purge.add_argument("--yes", action="store_true", help="really purge (jobs already fetched by a worker still run)")
    purge.set_defaults(run=run_purge)
    worker = commands.add_parser("worker", help="start workers: python -m worker.launch (needs torch)")
    worker.add_argument("--model", help="model to serve (KRONOS_MODEL)")
    worker.add_argument("--cpu", action="store_true", help="one CPU worker, even if GPUs are visible")
    worker.add_argument("--devices", help="comma-separated GPU indices (default: every visible GPU)")
    worker.add_argument("celery_args", nargs="*", metavar="-- CELERY_ARGS", help="passed to `celery worker`")
    worker.set_defaults(run=run_worker, json=False)

    # Everything after `demo` goes to the demo as it is (see main): `kronos-worker demo --help` shows its options.
    demo = commands.add_parser("demo", add_help=False, help="the quick start: python -m worker.demo [--json]")
    demo.set_defaults(run=run_demo, json=False)
    return parser


def run_submit(args: argparse.Namespace) -> int:
    options = {
        "series_id": args.series_id,
        "pred_len": args.pred_len,
        "freq": args.freq,
        "sample_count": args.sample_count,
        "quantiles": args.quantiles,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "model": args.model,
        "priority": args.priority,
        "job_id": args.job_id,
    }
    with KronosClient() as client:
        try:
            job = client.submit(args.file, **options)
        except JobFailed as invalid:
            raise UsageError(f"invalid request: {invalid}") from None
        if job.duplicate:
            print(f"{PROG}: job {job.id} was submitted before; not sending it again", file=sys.stderr)
        if args.wait:
            return _show_result(job, args, duplicate=job.duplicate)
    if args.json:
        _print_json({"job_id": job.id, "duplicate": job.duplicate})
    else:
        print(job.id)
    return 0


def run_result(args: argparse.Namespace) -> int:
    with KronosClient() as client:
        job = client.job(args.job_id)
        if args.wait:
            return _show_result(job, args)
        status = job.poll()
    if status.error is not None and status.finished:
        raise JobFailed(status.error)
    if args.json:
        _print_json(status.to_json())
    elif status.result is not None:
        print(describe_result(status.result))
    else:
        print(f"job {status.job_id} is {status.describe()}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    with KronosClient() as client:
        heartbeats = client.workers()
        depths = client.queue_depths()
    now = time.time()
    ready = [heartbeat for heartbeat in heartbeats if heartbeat.ready and not heartbeat.is_stale(now)]
    if args.json:
        workers = [{**heartbeat.model_dump(mode="json"), "stale": heartbeat.is_stale(now)} for heartbeat in heartbeats]
        _print_json({"ready_workers": len(ready), "workers": workers, "queues": depths})
    else:
        worker_rows = [_worker_row(heartbeat, now) for heartbeat in heartbeats]
        print(_table(["WORKER", "MODEL", "DEVICE", "STATE", "REVISION", "IN FLIGHT", "DONE", "SEEN"], worker_rows))
        print()
        print(_table(["QUEUE", "WAITING"], [[queue, str(depth)] for queue, depth in depths.items()]))
    if not ready:
        seen = f"{len(heartbeats)} worker(s) reported, none ready" if heartbeats else "no worker has reported"
        return _fail(f"no worker is ready ({seen}); start one with `{PROG} worker`", EXIT_JOB_FAILED)
    return 0


def run_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError("purge deletes every queued job of the served models: add --yes to do it")
    with KronosClient() as client:
        settings = client.settings
        models = args.model or list(settings.models)
        unknown = sorted(set(models) - set(settings.models))
        if unknown:
            raise UsageError(f"not served models (KRONOS_MODELS): {', '.join(unknown)}")
        queues = [queue for model in models for queue in serving_queues(model, settings)]
        with client._reaching(settings.broker_url, "KRONOS_BROKER_URL"):
            purged = purge(client.broker, client.results, queues, settings.result_expires)
    if args.json:
        _print_json({"purged": purged})
    else:
        print(f"purged {len(purged)} job(s) from {', '.join(queues)}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    history = read_candles_csv(args.csv)
    with KronosClient() as client:
        result = client.job(args.job_id).wait(timeout=args.timeout)
    path = plot_forecast(result, history, args.output, history_candles=args.history)
    if args.json:
        _print_json({"job_id": result.job_id, "path": str(path), "synthetic_model": result.synthetic_model})
    else:
        print(f"wrote {path}")
    return 0


def run_schema(args: argparse.Namespace) -> int:
    schemas = json_schemas()
    _print_json(schemas[args.name] if args.name else schemas)
    return 0


def run_worker(args: argparse.Namespace) -> NoReturn:
    command = ["-m", "worker.launch"]
    if args.model:
        command += ["--model", args.model]
    if args.cpu:
        command.append("--cpu")
    if args.devices:
        command += ["--devices", args.devices]
    if args.celery_args:
        command += ["--", *args.celery_args]
    _exec_python(command)


def run_demo(args: argparse.Namespace) -> NoReturn:
    _exec_python(["-m", "worker.demo", *args.passed_on])


def describe_result(result: ForecastResult) -> str:
    """A finished forecast for people: a header naming the series, model and worker, then a table of the
    mean of each column and the quantiles of close per future timestamp."""
    model = result.model_id + (f" @ {result.model_revision[:12]}" if result.model_revision else "")
    header = f"{result.series_id}: {len(result.timestamps)} steps forecast by {result.model}"
    if result.synthetic_model:
        header += f" ({UNTRAINED_LABEL})"
    details = (
        f"model {model} · {result.sample_count} sample path(s) · worker {result.worker} · "
        f"{result.timings.total:.2f} s · job {result.job_id}"
    )
    frame = result.to_frame()
    columns = [column for column in frame.columns if "_q" not in column]
    columns += [column for column in frame.columns if column.startswith("close_q")]
    whole = {column: "{:,.0f}".format for column in columns if column in _WHOLE_NUMBER_COLUMNS}
    table = frame[columns].to_string(float_format="{:.4f}".format, formatters=whole)
    return "\n".join([header, details, table])


def _show_result(job: ForecastJob, args: argparse.Namespace, **extra: Any) -> int:
    result = job.wait(timeout=args.timeout, progress=args.progress)
    if args.json:
        _print_json({**JobStatus(job.id, "SUCCESS", result=result).to_json(), **extra})
    else:
        print(describe_result(result))
    return 0


def _worker_row(heartbeat: WorkerHeartbeat, now: float) -> list[str]:
    if heartbeat.is_stale(now):
        state = "gone"
    elif heartbeat.ready:
        state = "ready"
    else:
        state = f"not ready: {heartbeat.reason or 'no reason given'}"
    model = heartbeat.model + (" (UNTRAINED)" if heartbeat.synthetic_model else "")
    return [
        heartbeat.worker,
        model,
        heartbeat.device or "-",
        state,
        (heartbeat.model_revision or "-")[:12],
        str(heartbeat.jobs_in_flight),
        str(heartbeat.jobs_done),
        f"{max(0.0, now - heartbeat.updated_at):.0f} s ago",
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        rows = [["(none)", *([""] * (len(headers) - 1))]]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def _exec_python(arguments: list[str]) -> NoReturn:
    if importlib.util.find_spec("torch") is None:
        raise UsageError("this command runs the worker, which needs torch: pip install torch 'kronos-worker[worker]'")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *arguments])


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _quantiles(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


if __name__ == "__main__":
    sys.exit(main())
