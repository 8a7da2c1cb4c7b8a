"""Start one worker process per visible GPU (or one CPU worker), and supervise them.

    python -m worker.launch [--model kronos-small] [--devices 0,1 | --cpu] [-- extra celery worker args]

Each child is `celery -A worker.app worker -n gpu<i>@%h` with KRONOS_DEVICE=cuda:<i> (indices are
those visible after CUDA_VISIBLE_DEVICES). SIGTERM and SIGINT are passed on, so every child makes its
warm shutdown; the launcher exits when all children have, with the first non-zero status among them.
"""

import argparse
import os
import signal
import subprocess
import sys


def visible_gpus() -> list[int]:
    try:
        import torch
    except ImportError:
        return []
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def plan(devices: list[int], cpu: bool) -> list[tuple[str, str]]:
    """(worker name prefix, KRONOS_DEVICE) for each process to start."""
    if cpu or not devices:
        return [("cpu", "cpu")]
    return [(f"gpu{i}", f"cuda:{i}") for i in devices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model to serve (sets KRONOS_MODEL)")
    parser.add_argument("--devices", help="comma-separated GPU indices (default: every visible GPU)")
    parser.add_argument("--cpu", action="store_true", help="one CPU worker, even if GPUs are visible")
    parser.add_argument("celery_args", nargs="*", help="passed to `celery worker` (after --)")
    args = parser.parse_args(argv)

    devices = [int(i) for i in args.devices.split(",")] if args.devices else visible_gpus()
    children = []
    for name, device in plan(devices, args.cpu):
        env = dict(os.environ, KRONOS_DEVICE=device)
        if args.model:
            env["KRONOS_MODEL"] = args.model
        command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-n", f"{name}@%h", *args.celery_args]
        print(f"starting {name}: KRONOS_DEVICE={device} {' '.join(command[1:])}", flush=True)
        children.append(subprocess.Popen(command, env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    statuses = [child.wait() for child in children]
    return next((status for status in statuses if status), 0)


if __name__ == "__main__":
    sys.exit(main())
