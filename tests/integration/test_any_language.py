"""The producer examples of docs/PRODUCERS.md (POSIX shell with redis-cli, Node.js over a raw socket), run
against a real redis-server and worker: the same request gives the same forecast as the Python client."""

import json
import shutil
import subprocess

import kronos_cases as kc
import numpy as np
import pytest
from worker_process import REPO_ROOT, serving_env

from schemas import ForecastRequest, ForecastResult

SHELL_EXAMPLE = REPO_ROOT / "examples" / "shell" / "enqueue.sh"
NODE_EXAMPLE = REPO_ROOT / "examples" / "node" / "enqueue.mjs"
# Greedy decoding: the forecast depends on the request only, whoever sends it.
GREEDY = {"pred_len": 8, "top_k": 1, "top_p": 1.0}


@pytest.fixture(scope="module")
def env(server):
    return serving_env(server)


@pytest.fixture(scope="module")
def request_file(tmp_path_factory):
    """The request as another language would hold it: JSON text, without a job id."""
    request = ForecastRequest.from_frame(kc.candles().iloc[100:164], series_id="any-language", **GREEDY)
    path = tmp_path_factory.mktemp("producers") / "request.json"
    path.write_text(request.model_dump_json(exclude_none=True))
    return path


@pytest.fixture(scope="module")
def python_result(worker, client) -> ForecastResult:
    return client.submit(kc.candles().iloc[100:164], series_id="any-language", **GREEDY).wait(timeout=60)


def run_example(command: list[str], env: dict[str, str], **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**env, **variables}, capture_output=True, text=True, timeout=120)


def assert_same_forecast(stored: dict, expected: ForecastResult) -> ForecastResult:
    assert stored["status"] == "SUCCESS", stored
    result = ForecastResult.model_validate(stored["result"])
    assert result.series_id == expected.series_id and result.timestamps == expected.timestamps
    for column, values in expected.forecast.items():
        np.testing.assert_allclose(result.forecast[column], values, rtol=1e-5)
    return result


@pytest.mark.parametrize("priority", ["0", "7"])
def test_shell_example_gives_the_python_result(worker, env, request_file, python_result, client, priority):
    completed = run_example(["sh", str(SHELL_EXAMPLE), str(request_file)], env, KRONOS_PRIORITY=priority)
    assert completed.returncode == 0, completed.stderr
    assert f"priority {priority}" in completed.stderr
    result = assert_same_forecast(json.loads(completed.stdout), python_result)
    # The shell wrote the job record, so the Python client can follow its job too.
    assert client.job(result.job_id).result(timeout=10) == result


def test_shell_example_resent_with_its_id_queues_nothing(worker, env, request_file):
    first = run_example(["sh", str(SHELL_EXAMPLE), str(request_file)], env, KRONOS_JOB_ID="shell-once")
    again = run_example(["sh", str(SHELL_EXAMPLE), str(request_file)], env, KRONOS_JOB_ID="shell-once")
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert "was submitted before; not sending it again" in again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert worker.log().count("kronos.forecast[shell-once] received") == 1


def test_shell_example_reports_a_failed_job(worker, env, request_file, tmp_path):
    too_long = tmp_path / "too-long.json"
    too_long.write_text(json.dumps({**json.loads(request_file.read_text()), "pred_len": 100000}))
    completed = run_example(["sh", str(SHELL_EXAMPLE), str(too_long)], env)
    assert completed.returncode == 1
    stored = json.loads(completed.stdout)
    assert stored["status"] == "FAILURE" and stored["result"]["exc_type"] == "JobFailed"
    error = stored["result"]["exc_message"][0]
    assert error["code"] == "INVALID_INPUT" and error["field"] == "pred_len" and error["retryable"] is False


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("priority", ["0", "3"])
def test_node_example_gives_the_python_result(worker, env, request_file, python_result, priority):
    completed = run_example(["node", str(NODE_EXAMPLE), str(request_file)], env, KRONOS_PRIORITY=priority)
    assert completed.returncode == 0, completed.stderr
    assert f"priority {priority}" in completed.stderr
    assert_same_forecast(json.loads(completed.stdout), python_result)
