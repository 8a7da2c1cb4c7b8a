"""A stock Celery client in another language: celery-node (npm) submits forecasts and reads their outcomes,
parsed by Node's JSON.parse, against a real redis-server and worker: with shared queues, and with producer
identities (a job id in the producer's namespace). examples/node-celery is the documented example."""

import json
import shutil
import subprocess
import uuid

import kronos_cases as kc
import pytest
from redis_server import RedisServer
from worker_process import REPO_ROOT, WorkerProcess, serving_env

from schemas import ForecastRequest

EXAMPLE = REPO_ROOT / "examples" / "node-celery"


@pytest.fixture(scope="module")
def node_example() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed (apt-get install nodejs npm)")
    if not (EXAMPLE / "node_modules" / "celery-node").is_dir():
        installed = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True, timeout=300
        )
        if installed.returncode != 0:
            pytest.skip(f"celery-node could not be installed from npm: {installed.stderr[-500:]}")


def request_file(tmp_path, nan_price: bool = False) -> str:
    request = ForecastRequest.from_frame(kc.candles().iloc[100:164], series_id="from-node", pred_len=4)
    document = request.model_dump(mode="json", exclude_none=True)
    if nan_price:  # a NaN price as JavaScript writes it in JSON (JSON.stringify(NaN) is null)
        document["candles"]["close"][1] = None
    path = tmp_path / f"request-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(document))
    return str(path)


def submit(env: dict[str, str], request: str, *, queue: str, producer: str | None = None) -> dict:
    node_env = {**env, "KRONOS_QUEUE": queue}
    if producer:
        node_env["KRONOS_PRODUCER"] = producer
    done = subprocess.run(
        ["node", "submit.js", request], cwd=EXAMPLE, env=node_env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # Node parsed the stored outcome with JSON.parse


@pytest.mark.parametrize("producers", [None, "alpha"])
def test_celery_node_submits_and_reads_success_and_invalid_input(node_example, tmp_path, producers):
    with RedisServer() as server:
        extra = {"KRONOS_PRODUCERS": producers} if producers else {}
        env = serving_env(server, **extra)
        queue = f"kronos.kronos-small.{producers}" if producers else "kronos.kronos-small"
        with WorkerProcess(env, name="node"):
            ok = submit(env, request_file(tmp_path), queue=queue, producer=producers)
            assert ok["status"] == "SUCCESS", ok
            assert len(ok["result"]["forecast"]["close"]) == 4 and ok["result"]["job_id"] == ok["job_id"]
            failed = submit(env, request_file(tmp_path, nan_price=True), queue=queue, producer=producers)
            assert failed["status"] == "FAILURE" and failed["error"]["code"] == "INVALID_INPUT", failed
