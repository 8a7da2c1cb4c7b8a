"""What importing the producer side pulls in, and that a bad variable fails on first use, not at import: each
in a fresh Python process, since this one has imported everything already."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_importing_schemas_does_not_import_torch() -> None:
    subprocess.run(
        [sys.executable, "-c", "import schemas, sys; assert 'torch' not in sys.modules"],
        cwd=REPO_ROOT,
        check=True,
    )


def test_producer_imports_pull_in_no_torch_and_no_worker_code() -> None:
    probe = (
        "import sys, tasks, celeryconfig\n"
        "from tasks import app\n"
        "app.conf.task_queues\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'worker', 'model'})\n"
        "assert not heavy, heavy\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("KRONOS_")}
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr


def test_bad_variable_fails_on_first_use_not_at_import() -> None:
    probe = "import tasks, celeryconfig, tasks.app\nprint('imported', flush=True)\ntasks.app.conf.broker_url\n"
    env = dict(os.environ, KRONOS_PREFETCH_MULTIPLIER="many")
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.stdout == "imported\n"
    assert completed.returncode != 0
    assert "SettingsError: KRONOS_PREFETCH_MULTIPLIER must be a whole number >= 1, got 'many'" in completed.stderr
