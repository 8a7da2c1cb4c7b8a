"""The `kronos-worker` command (tasks/cli.py), run as a subprocess against a real redis-server and worker."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

import kronos_cases as kc
import numpy as np
import pytest
from redis_server import free_port
from worker_process import REPO_ROOT, serving_env, stop_launcher


@pytest.fixture(scope="module")
def env(server):
    return serving_env(
        server,
        KRONOS_PROGRESS_INTERVAL="0.001",
    )


@pytest.fixture(scope="module")
def candles_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "kline.csv"
    kc.candles().iloc[200:464].to_csv(path, index=False)
    return path


def cli(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *map(str, args)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(completed: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command; no traceback anywhere."""
    assert completed.returncode != 0
    assert "Traceback" not in completed.stdout + completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kronos-worker"), completed.stderr
    return lines[0]


def test_submit_then_result_by_id(worker, env, candles_csv):
    submitted = cli("submit", candles_csv, "--pred-len", 6, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    waited = cli("result", job_id, "--wait", "--timeout", 60, env=env)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.startswith("kline: 6 steps forecast by kronos-small")
    assert "UNTRAINED" not in waited.stdout  # the fixture checkpoint has no marker
    assert len(waited.stdout.splitlines()) == 2 + 2 + 6  # header, details, column names, index name, rows

    assert cli("result", job_id, env=env).stdout == waited.stdout


def test_every_command_answers_json(worker, env, candles_csv, tmp_path):
    submitted = cli("submit", candles_csv, "--pred-len", 4, "--json", env=env)
    job = json.loads(submitted.stdout)
    assert job["duplicate"] is False

    waited = json.loads(cli("submit", candles_csv, "--pred-len", 4, "--wait", "--json", env=env).stdout)
    assert waited["state"] == "SUCCESS" and waited["result"]["series_id"] == "kline" and waited["duplicate"] is False

    result = json.loads(cli("result", job["job_id"], "--wait", "--json", env=env).stdout)
    assert result["job_id"] == job["job_id"] and len(result["result"]["forecast"]["close"]) == 4
    assert json.loads(cli("result", job["job_id"], "--json", env=env).stdout) == result

    status = json.loads(cli("status", "--json", env=env).stdout)
    assert status["ready_workers"] == 1 and status["workers"][0]["worker"].startswith("cpu@")

    plotted = json.loads(
        cli("plot", job["job_id"], "--csv", candles_csv, "-o", tmp_path / "p.png", "--json", env=env).stdout
    )
    assert plotted == {"job_id": job["job_id"], "path": str(tmp_path / "p.png"), "synthetic_model": False}

    schemas = json.loads(cli("schema", "--json", env=env).stdout)
    assert set(schemas) == {"request", "result", "error"}
    request_schema = json.loads(cli("schema", "request", env=env).stdout)
    assert request_schema == schemas["request"] and "candles" in request_schema["properties"]


def test_status_lists_workers_and_queue_depths_over_priority_lists(worker, env, server, candles_csv):
    for priority in (0, 3):
        queued = cli("submit", candles_csv, "--model", "kronos-base", "--priority", priority, env=env)
        assert queued.returncode == 0, queued.stderr
    try:
        shown = cli("status", env=env)
        assert shown.returncode == 0, shown.stderr
        assert "cpu@" in shown.stdout and "ready" in shown.stdout and "kronos-small" in shown.stdout
        depths = json.loads(cli("status", "--json", env=env).stdout)["queues"]
        assert depths == {"kronos.kronos-small": 0, "kronos.kronos-base": 2, "kronos.kronos-mini": 0}
    finally:
        with server.client(0) as broker:
            broker.delete("kronos.kronos-base", "kronos.kronos-base\x06\x163")


def test_status_fails_when_no_worker_is_ready(server, env):
    nobody = dict(env, KRONOS_BROKER_URL=server.url(5))  # a DB no worker publishes its heartbeat in
    completed = cli("status", env=nobody)
    assert completed.returncode == 1
    assert "no worker is ready (no worker has reported)" in one_line_error(completed)
    assert "(none)" in completed.stdout


def test_progress_bar_advances_on_stderr(worker, env, candles_csv):
    completed = cli("submit", candles_csv, "--pred-len", 300, "--wait", "--progress", env=env)
    assert completed.returncode == 0, completed.stderr
    # Redrawn in place with carriage returns (which text mode reads as line ends).
    bars = [segment for segment in completed.stderr.splitlines() if "/300 steps" in segment]
    steps = [int(bar.split("] ")[1].split("/")[0]) for bar in bars]
    assert len(set(steps)) >= 3 and steps == sorted(steps) and steps[-1] == 300, completed.stderr
    assert "[" + "#" * 30 + "] 300/300 steps" in bars[-1]


def test_plot_writes_a_png_of_history_and_forecast(worker, env, candles_csv, tmp_path):
    from matplotlib.image import imread

    job = json.loads(
        cli("submit", candles_csv, "--pred-len", 12, "--sample-count", 4, "--quantiles", "0.1,0.5,0.9", "--wait",
            "--json", env=env).stdout
    )  # fmt: skip
    output = tmp_path / "forecast.png"
    completed = cli("plot", job["job_id"], "--csv", candles_csv, "-o", output, env=env)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"wrote {output}"
    pixels = imread(output)
    assert pixels.shape[:2] == (500, 1000)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 2
    assert (rgb < 0.95).any(axis=1).mean() > 0.01


def test_resubmitting_a_job_id_sends_nothing(worker, env, candles_csv):
    first = json.loads(cli("submit", candles_csv, "--job-id", "cli-dedupe", "--wait", "--json", env=env).stdout)
    again = cli("submit", candles_csv, "--job-id", "cli-dedupe", "--wait", "--json", env=env)
    assert again.returncode == 0
    assert "was submitted before; not sending it again" in again.stderr
    second = json.loads(again.stdout)
    assert second["duplicate"] is True and second["result"] == first["result"]
    assert worker.log().count("kronos.forecast[cli-dedupe] received") == 1


def test_a_failed_job_exits_1_with_its_error(worker, env, candles_csv):
    completed = cli("submit", candles_csv, "--pred-len", 100000, "--wait", "--json", env=env)
    assert completed.returncode == 1
    assert "failed: INVALID_INPUT: pred_len: a horizon of 100000 steps" in one_line_error(completed)
    assert json.loads(completed.stdout)["error"]["code"] == "INVALID_INPUT"


def test_waiting_past_the_timeout_exits_4(worker, env, candles_csv):
    completed = cli("submit", candles_csv, "--series-id", "fault:sleep:2", "--wait", "--timeout", 0.5, env=env)
    assert completed.returncode == 4
    assert "did not finish within 0.5 s" in one_line_error(completed)


@pytest.mark.parametrize(
    "content, exit_code, message",
    [
        (None, 2, "missing.csv: no such file"),
        ("timestamps,open,high,low\n2024-01-01 00:00,1,2,0.5\n", 2, "missing column(s) close"),
        ("timestamps,open,high,low,close\nMonday,1,2,0.5,1\n", 2, "line 2: timestamps 'Monday' is not an ISO 8601"),
        ("timestamps,open,high,low,close\n2024-01-01 00:00,1,0.5,0.5,1\n", 2, "invalid request: candles.high"),
    ],
    ids=["unreadable", "missing-column", "bad-timestamp", "invalid-candles"],
)
def test_bad_input_files_are_one_line_errors(env, tmp_path, content, exit_code, message):
    path = tmp_path / "missing.csv"
    if content is not None:
        path.write_text(content)
    completed = cli("submit", path, env=env)
    assert completed.returncode == exit_code
    assert message in one_line_error(completed)


@pytest.mark.parametrize("command", [["result", "no-such-job"], ["plot", "no-such-job", "-o", "x.png"]])
def test_an_unknown_job_id_exits_3(env, candles_csv, command):
    arguments = [*command, "--csv", candles_csv] if command[0] == "plot" else command
    completed = cli(*arguments, env=env)
    assert completed.returncode == 3
    assert "no job 'no-such-job'" in one_line_error(completed)


@pytest.mark.parametrize("command", [["submit", "{csv}"], ["result", "some-id"], ["status"]])
def test_redis_down_exits_5_naming_the_url_without_password(env, candles_csv, command):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    arguments = [str(candles_csv) if part == "{csv}" else part for part in command]
    completed = cli(*arguments, env=dict(env, KRONOS_BROKER_URL=url, KRONOS_RESULT_BACKEND=""))
    assert completed.returncode == 5
    error = one_line_error(completed)
    assert "cannot reach Redis at redis://127.0.0.1:" in error and "is it running? set KRONOS_BROKER_URL" in error
    assert "hunter2" not in completed.stderr


def test_bad_arguments_are_one_line_errors(env):
    completed = cli("submit", "x.csv", "--quantiles", "low,high", env=env)
    assert completed.returncode == 2
    assert "--quantiles: 'low,high' is not a comma-separated list of numbers" in one_line_error(completed)


def test_worker_command_runs_the_launcher(env):
    # Its own DBs, so this second worker takes none of the module worker's jobs.
    launcher_env = dict(env, KRONOS_BROKER_URL=env["KRONOS_BROKER_URL"][:-1] + "3")
    launcher_env["KRONOS_RESULT_BACKEND"] = env["KRONOS_BROKER_URL"][:-1] + "4"
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "worker", "--cpu", "--", "-l", "info", "--without-mingle"],
        env=launcher_env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        until = time.monotonic() + 60
        while time.monotonic() < until and not any("ready." in line for line in lines):
            lines.append(process.stdout.readline())
        assert lines[0].startswith("starting cpu: KRONOS_DEVICE=cpu -m celery -A worker.app worker"), "".join(lines)
        assert any("ready." in line for line in lines), "".join(lines)
        process.send_signal(signal.SIGTERM)  # reaches the launcher itself: the CLI process became it
        assert process.wait(30) == 0
    finally:
        stop_launcher(process)


def test_demo_command_runs_the_demo_module(env):
    completed = cli("demo", "--help", env=env)
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage: python -m worker.demo")


def test_kronos_worker_entry_point():
    [script] = [point for point in entry_points(group="console_scripts") if point.name == "kronos-worker"]
    assert script.value == "kronos_cli:main"


def test_a_bad_variable_is_one_line_naming_it_not_a_traceback():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, kronos_cli; sys.exit(kronos_cli.main())", "status"],
        env={**os.environ, "KRONOS_MODELS": "kronos-small,kronos small"},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [completed.stderr.strip()] and "Traceback" not in completed.stderr
    assert completed.stderr.startswith("kronos-worker: KRONOS_MODELS must be")
