"""The quick-start demo (worker/demo.py) end to end: its own Redis and worker, the bundled untrained
checkpoint when the Hub cannot be reached, a forecast labelled as such, a plot, everything stopped."""

import json
import os
import shutil
import subprocess
import sys
import time

import kronos_cases as kc
import pytest
from redis_server import free_port
from sentinel_cluster import MASTER_NAME, SentinelCluster
from worker_process import REPO_ROOT

from tasks.keys import RESULT_KEY_PREFIX
from worker import demo

pytestmark = pytest.mark.slow


FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_demo(tmp_path, plot, **variables) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("KRONOS_", "REDIS_"))}
    environment.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO_ROOT), **variables)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "worker.demo", "--json", "--output", str(plot)],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert time.monotonic() - started < 60
    return completed


def test_demo_falls_back_to_the_bundled_checkpoint_and_says_so(tmp_path):
    plot = tmp_path / "demo.png"
    # An empty Hugging Face cache and no Hub, wherever the test runs.
    completed = run_demo(tmp_path, plot, HF_HUB_OFFLINE="1")

    narration = completed.stderr.splitlines()
    [fallback] = [line for line in narration if line.startswith("Hugging Face Hub unreachable")]
    assert "bundled UNTRAINED checkpoint" in fallback
    assert any(line.startswith("Redis: started") for line in narration)
    assert any("forecast by kronos-small (UNTRAINED MODEL" in line for line in narration)
    assert narration[-1].startswith("Stopped the worker and Redis")

    outcome = json.loads(completed.stdout)
    result = outcome["result"]
    assert result["synthetic_model"] is True and result["model"] == "kronos-small"
    assert len(result["timestamps"]) == 24 and set(result["quantiles"]) == {"0.1", "0.5", "0.9"}
    assert result["sample_count"] == 8
    assert outcome["embedded_redis"] is True and outcome["fallback_reason"] == "HF_HUB_OFFLINE is set"
    assert outcome["plot"] == str(plot) and plot.stat().st_size > 10_000


def test_hub_probe_names_what_failed(monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setattr(demo.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(demo.hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert demo.hub_unreachable_reason() == "127.0.0.1: Connection refused"


def test_demo_serves_the_published_model_from_the_hugging_face_cache(tmp_path):
    # A cache laid out as huggingface_hub writes it, holding the tiny fixture weights under the published
    # repo ids: the demo must take the cached model, and its worker must load it without the Hub.
    for repo, fixture in (("Kronos-small", "predictor"), ("Kronos-Tokenizer-base", "tokenizer")):
        cached = tmp_path / "hf" / "hub" / f"models--NeoQuasar--{repo}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(FAKE_COMMIT)
        shutil.copytree(kc.PARITY / fixture, cached / "snapshots" / FAKE_COMMIT)
    completed = run_demo(tmp_path, tmp_path / "demo.png")
    assert "Hugging Face Hub unreachable" not in completed.stderr and "UNTRAINED" not in completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome["fallback_reason"] is None
    result = outcome["result"]
    assert result["model_id"] == "NeoQuasar/Kronos-small" and result["model_revision"] == FAKE_COMMIT
    assert result["tokenizer_id"] == "NeoQuasar/Kronos-Tokenizer-base" and result["synthetic_model"] is False


def test_demo_runs_on_redis_sentinel(tmp_path):
    """Pointed at sentinels, the demo's worker and client find the master through them, as every process does."""
    with SentinelCluster() as cluster:
        completed = run_demo(tmp_path, tmp_path / "demo.png", HF_HUB_OFFLINE="1", KRONOS_BROKER_URL=cluster.url(0),
                             KRONOS_SENTINEL_MASTER=MASTER_NAME)  # fmt: skip
        assert any(line.startswith("Redis: using sentinel://") for line in completed.stderr.splitlines())
        outcome = json.loads(completed.stdout)
        assert outcome["embedded_redis"] is False and len(outcome["result"]["timestamps"]) == 24
        with cluster.master().client(1) as results:  # the result backend: DB 1 of the same sentinels' master
            assert results.exists(RESULT_KEY_PREFIX + outcome["result"]["job_id"])
